"""The LLaDA backbone shared by MMaDA, Lumina-DiMOO and both MMaDA-Parallel variants.

A bidirectional pre-norm transformer over the joint text + image vocabulary: RMSNorm in fp32,
NeoX rotate-half RoPE, SwiGLU feed-forward (`ff_proj` gate, `up_proj` up, `ff_out` down), no
biases, untied head. Parameter names match the released safetensors (`model.transformer.wte`,
`.blocks.{i}.q_proj` ... `.ln_f`, `.ff_out`) so checkpoints load without renaming
(upstream-facts §1.1). Pads are masked out as keys and skipped by the position ids, so a
left-padded row gives the same logits as the row alone. No IO here: see model/checkpoint.py.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, with the field names of LLaDA / MMaDA `config.json`."""

    d_model: int = 4096
    """Hidden size."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Attention heads (head dim = d_model / n_heads)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (as in LLaDA-8B)."""
    mlp_hidden_size: int = 12288
    """Inner size of the SwiGLU feed-forward."""
    vocab_size: int = 126464
    """Tokenizer-side vocabulary size."""
    embedding_size: int | None = 134656
    """Rows of `wte` and outputs of `ff_out`; None means vocab_size."""
    max_sequence_length: int = 4096
    """Longest sequence the model is used with (RoPE itself has no limit)."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the random initialisation (tiny models trained from scratch)."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rows(self) -> int:
        return self.embedding_size or self.vocab_size

    def to_dict(self) -> dict:
        return {"model_type": "llada", "rope": True, "rope_full_precision": True,
                "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms",
                "include_bias": False, "weight_tying": False, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Reads a LLaDA/MMaDA config.json dict; unknown keys are ignored, unsupported values refused."""
        for key, want in (("weight_tying", False), ("include_bias", False), ("rope", True)):
            if key in d and d[key] != want:
                raise ValueError(f"config.json has {key}={d[key]!r}; only {key}={want} is supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables for NeoX rotate-half RoPE, in fp32. positions (B, L) -> (B, 1, L, hd)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    """Pre-norm LLaDA block: x + attn(norm(x)); h + ff_out(silu(ff_proj(m)) * up_proj(m))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.d_model // cfg.n_heads
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, key_mask):
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(n).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False,
                                           enable_gqa=self.kv_heads != self.n_heads)
        h = x + self.attn_out(y.transpose(1, 2).reshape(B, L, -1))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.rows, cfg.d_model),
            blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=nn.Linear(cfg.d_model, cfg.rows, bias=False),
        ))


class DiffusionLM(nn.Module):
    """Mask predictor p(x0 | x_t) over the joint vocabulary; `model.` prefix as in LLaDAModelLM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LLaDAModel(cfg)
        self.gradient_checkpointing = False

    def init_weights(self, seed: int | None = None) -> "DiffusionLM":
        """Random init for training from scratch (normal std, scaled output projections, unit norms)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out_std = self.config.init_std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                residual_out = name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight"))
                std = out_std if residual_out else self.config.init_std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_n: int | None = None) -> torch.Tensor:
        """Logits for every position (or only the last `last_n`, sparing the head on the prompt).

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) bool, True on real tokens; pads are never attended to and do
                not advance the position ids. None means no padding.
            last_n: if set, return logits of the last last_n positions only.
        Returns:
            (B, L, V) logits in the parameters' dtype ((B, last_n, V) with last_n).
        """
        t = self.model.transformer
        B, L = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
            key_mask = None
        else:
            attention_mask = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
            key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, L): True = attend
        cos, sin = rope_cos_sin(positions, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        x = t.wte(input_ids)  # (B, L, D)
        for block in t.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask)
        if last_n is not None:
            x = x[:, -last_n:]
        return t.ff_out(t.ln_f(x))  # (B, L, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
