"""The LLaDA backbone shared by MMaDA, Lumina-DiMOO and both MMaDA-Parallel variants.

A bidirectional pre-norm transformer over the joint text + image vocabulary: RMSNorm in fp32,
NeoX rotate-half RoPE, SwiGLU feed-forward (`ff_proj` gate, `up_proj` up, `ff_out` down), no
biases, untied head. Parameter names match the released safetensors (`model.transformer.wte`,
`.blocks.{i}.q_proj` ... `.ln_f`, `.ff_out`) so checkpoints load without renaming
(upstream-facts §1.1). Pads are masked out as keys and skipped by the position ids, so a
left-padded row gives the same logits as the row alone. Upstream config values that would
compute something else are refused by name (BACKBONE_FIELDS). ParaPipe's own fresh models may add
learned row/column embeddings on image blocks (ModelConfig.image_pos_grid; upstream has none).
No IO here: see model/checkpoint.py.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# Upstream config.json fields (LLaDA `configuration_llada.py`) that select a different computation.
# This backbone computes exactly one value of each: the LLaDA-8B one, listed first and written by
# to_dict. Released config.json files list every field; an absent field means that value here.
BACKBONE_FIELDS: dict[str, tuple] = {
    "model_type": ("llada", "mmada"),      # LLaDAConfig / MMadaConfig; anything else is another family
    "block_type": ("llama",),              # q/k/v/attn_out + ff_proj/up_proj/ff_out; not sequential/parallel
    "activation_type": ("silu",),          # silu(ff_proj(m)) * up_proj(m) in the llama block
    "layer_norm_type": ("rms",),           # x * rsqrt(mean(x^2) + eps) * weight, in fp32
    "layer_norm_with_affine": (True,),     # the norms have a weight
    "bias_for_layer_norm": (False, None),  # None inherits include_bias
    "include_bias": (False,),
    "include_qkv_bias": (False, None),
    "attention_layer_norm": (False,),      # no q/k norm
    "input_emb_norm": (False,),            # no sqrt(d_model) scaling of the embeddings
    "scale_logits": (False,),              # no 1/sqrt(d_model) on the logits
    "weight_tying": (False,),              # separate ff_out head
    "rope": (True,),
    "rope_full_precision": (True,),        # RoPE is always applied in fp32 here
    "alibi": (False,),
    "block_group_size": (1,),              # grouped checkpoints name their tensors block_groups.*
    "clip_qkv": (None,),                   # OLMo's q/k/v clamp
}
# Accepted without effect: dropouts (`embedding_dropout`, `attention_dropout`, `residual_dropout`;
# no dropout here), `flash_attention` (same math), `alibi_bias_max` (alibi is off),
# `attention_layer_norm_with_affine` (no q/k norm), `init_*`, `precision`, `use_cache`, token ids
# (model/tokens.py reads those) and Hugging Face metadata.


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b  # JSON true is not 1, 1.0 is not 1


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
    image_pos_grid: tuple[int, int] | None = None
    """ParaPipe's fresh models only (upstream has no such thing; None): the (h, w) code grid of an image
    block. Learned row and column embeddings are added at the h*w positions after each `soi_id`, because
    with 1D RoPE alone a small model finds column = position mod w hard to learn (image_position_ids)."""
    soi_id: int | None = None
    """Id of <soi>, the token that opens an image block (with image_pos_grid)."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size={self.embedding_size} is below vocab_size={self.vocab_size}; "
                             f"the embedding needs a row for every id (raise embedding_size)")
        if self.image_pos_grid is not None:
            object.__setattr__(self, "image_pos_grid", tuple(self.image_pos_grid))  # JSON gives a list
            if len(self.image_pos_grid) != 2 or min(self.image_pos_grid) < 1 or self.soi_id is None:
                raise ValueError(f"image_pos_grid={self.image_pos_grid} needs two positive sizes (h, w) and "
                                 f"soi_id={self.soi_id} the <soi> token id")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rows(self) -> int:
        return self.embedding_size or self.vocab_size

    def to_dict(self) -> dict:
        return {**{k: v[0] for k, v in BACKBONE_FIELDS.items()}, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Reads a LLaDA/MMaDA config.json dict. Values this backbone does not compute are refused
        (BACKBONE_FIELDS); fields without effect on the logits and unknown keys are ignored."""
        for key, supported in BACKBONE_FIELDS.items():
            if key in d and not any(_same(d[key], s) for s in supported):
                raise ValueError(f"config.json has {key}={d[key]!r}, which model/transformer.py does not "
                                 f"compute; supported: {key}=" + " or ".join(repr(s) for s in supported))
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "mlp_hidden_size" in d and d["mlp_hidden_size"] is None:  # upstream: mlp_ratio * d_model
            kw["mlp_hidden_size"] = d.get("mlp_ratio", 4) * kw.get("d_model", cls.d_model)
        mqa = d.get("multi_query_attention")
        if mqa is not None:
            if not isinstance(mqa, bool):
                raise ValueError(f"config.json has multi_query_attention={mqa!r}; supported: true, false or null")
            heads = kw.get("n_heads", cls.n_heads)
            want = 1 if mqa else heads
            if kw.get("n_kv_heads") not in (None, want):
                raise ValueError(f"config.json has multi_query_attention={mqa!r} but n_kv_heads={kw['n_kv_heads']}; "
                                 f"they contradict each other (multi_query_attention={mqa!r} means n_kv_heads={want})")
            kw["n_kv_heads"] = want
        return cls(**kw)


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


def image_position_ids(input_ids: torch.Tensor, soi_id: int, grid: tuple[int, int]):
    """Row and column of every position inside an image block: the h*w positions right after a <soi>.

    input_ids (B, L) -> (row, col, inside), each (B, L); row/col are 0 outside (inside False there).
    Works on any layout whose image block is <soi> followed by the h*w codes (or masks), row-major.
    """
    h, w = grid
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
    start = torch.where(input_ids == soi_id, idx, -1).cummax(-1).values  # (B, L): last <soi> at or before
    k = idx - start - 1  # offset inside the block
    inside = (start >= 0) & (k >= 0) & (k < h * w)
    k = torch.where(inside, k, 0)
    return k // w, k % w, inside


def take_cols(t: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """(B, L) -> (B, A): the columns `cols`, (A,) shared by every row or (B, A) per row; None keeps all."""
    if cols is None:
        return t
    return t[:, cols] if cols.dim() == 1 else t.gather(1, cols)


EXPLICIT_ATTENTION_MAX_KEYS = 512
"""On CPU, attention over at most this many keys runs as explicit fp32 matmuls (attention()), not SDPA."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), masked keys at -inf) v, bidirectional.

    q (B, H, Lq, hd); k, v (B, Hkv, L, hd); key_mask (B, 1, 1, L) bool or None -> (B, H, Lq, hd) in q's dtype.
    On GPUs, for long sequences, and without autograd (sampling, evaluation) this is SDPA (flash /
    memory-efficient kernels). When training on CPU with at most EXPLICIT_ATTENTION_MAX_KEYS keys it is two
    fp32 matmuls and a softmax, with autocast off: the CPU flash kernel's backward dominates a step at toy
    lengths, and the explicit form made a toy-tiny SFT step (L = 88, batch 32, one thread, bf16 autocast)
    1.26x faster, with scores and softmax in fp32 as the kernel keeps them (`benchmarks/sft_recipe.py
    --speed-only --batch 32` prints the side-by-side figure). Forward-only, the kernel is the faster one
    (the toy sampler's best mode spent 29% of its time in the explicit form, 18-22% in SDPA).
    """
    B, H, Lq, hd = q.shape
    if q.device.type != "cpu" or k.shape[2] > EXPLICIT_ATTENTION_MAX_KEYS or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False,
                                              enable_gqa=k.shape[1] != H)
    if k.shape[1] != H:  # grouped-query attention: each k/v head serves H / Hkv query heads
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    with torch.autocast("cpu", enabled=False):
        scores = (q.float() * hd ** -0.5) @ k.float().transpose(-1, -2)  # (B, H, Lq, L)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)


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

    def forward(self, x, cos, sin, key_mask, kv: list | None = None, cols: torch.Tensor | None = None):
        """x (B, L, D) -> (B, L, D). With `kv` and no `cols`, appends this layer's (k, v) (B, Hkv, L, hd).
        With `kv` = [(k, v)] and `cols` (A,) or per row (B, A), x holds only those A columns of the sequence:
        their fresh k/v are written into the cached ones in place and the A queries attend to all L keys."""
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(n).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cols is not None:
            kc, vc = kv[0]
            if cols.dim() == 1:
                kc[:, :, cols], vc[:, :, cols] = k, v
            else:  # each row its own columns (a repeated column writes the same values twice)
                at = cols[:, None, :, None].expand(-1, kc.shape[1], -1, kc.shape[3])  # (B, Hkv, A, hd)
                kc.scatter_(2, at, k)
                vc.scatter_(2, at, v)
            k, v = kc, vc
        elif kv is not None:
            kv.append((k, v))
        y = attention(q, k, v, key_mask)  # (B, H, L, hd)
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
        if cfg.image_pos_grid is not None:
            self.transformer["wpe_row"] = nn.Embedding(cfg.image_pos_grid[0], cfg.d_model)
            self.transformer["wpe_col"] = nn.Embedding(cfg.image_pos_grid[1], cfg.d_model)


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
                last_n: int | None = None, kv: list | None = None,
                head_cols: torch.Tensor | None = None, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position (or only the last `last_n`, sparing the head on the prompt).

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) bool, True on real tokens; pads are never attended to and do
                not advance the position ids. None means no padding.
            last_n: if set, return logits of the last last_n positions only.
            kv: if a list, each layer appends its post-RoPE (k, v), each (B, Hkv, L, hd), for
                forward_cols (the samplers' approximate caches); the logits do not change.
            head_cols: (A,) long, with last_n: the head runs only on these of the last_n positions
                (the sampler reads the logits of the slots it decides, not of every output slot).
            head_mask: (B, last_n) bool, with last_n: the head runs only where it is True (the RL
                learner scores the few tokens each replayed state credits).
        Returns:
            (B, L, V) logits in the parameters' dtype ((B, last_n, V) with last_n, (B, A, V) with head_cols,
            (N, V) with head_mask, its True positions in row-major order).
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
        x = self.embed(input_ids)  # (B, L, D)
        for block in t.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask, kv)
        if last_n is not None:
            x = x[:, -last_n:]
        if head_cols is not None:
            x = x[:, head_cols]
        if head_mask is not None:
            x = x[head_mask]  # (N, D)
        return t.ff_out(t.ln_f(x))  # (B, L, V)

    def forward_cols(self, input_ids: torch.Tensor, cols: torch.Tensor, attention_mask: torch.Tensor | None,
                     kv: list, head_cols: torch.Tensor | None = None,
                     head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a few columns against cached keys/values of the rest (approximate KV cache).

        Only the A columns in `cols` run through the blocks; every other position contributes the
        k/v stored in `kv` by an earlier forward(..., kv=[]) (stale where its context changed since:
        Fast-dLLM's prefix / dual cache). The fresh k/v of `cols` overwrite the cached ones in place.
        With every column in `cols` the result equals forward() up to float rounding.

        Args:
            input_ids: (B, L) the whole current sequence (only `cols` are read).
            cols: (A,) long column indices, the same for every row, or (B, A): each row its own (a row
                that needs fewer repeats one of its columns).
            attention_mask: (B, L) bool as in forward, or None.
            kv: per layer (k, v), each (B, Hkv, L, hd), as forward(..., kv=[]) filled it.
            head_cols: (A',) long indices into cols: the head runs only on those (the others only refresh k/v).
            head_mask: (B, A) bool: the head runs only where True.
        Returns:
            (B, A, V) logits ((B, A', V) with head_cols; (N, V) with head_mask, row-major).
        """
        t = self.model.transformer
        B, L = input_ids.shape
        if attention_mask is None:
            positions = cols.expand(B, -1)  # (B, A)
            key_mask = None
        else:
            attention_mask = attention_mask.bool()
            positions = take_cols((attention_mask.long().cumsum(-1) - 1).clamp(min=0), cols)  # (B, A)
            key_mask = attention_mask[:, None, None, :]
        cos, sin = rope_cos_sin(positions, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        x = self.embed(input_ids, cols)  # (B, A, D)
        for block, layer_kv in zip(t.blocks, kv):
            x = block(x, cos, sin, key_mask, [layer_kv], cols)
        if head_cols is not None:
            x = x[:, head_cols]
        if head_mask is not None:
            x = x[head_mask]  # (N, D)
        return t.ff_out(t.ln_f(x))  # (B, A, V)

    def embed(self, input_ids: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, L, D), plus the image row/column embeddings with image_pos_grid;
        with cols (A,) or (B, A), only those columns (B, A, D) (the block offsets still read the whole row)."""
        t, cfg = self.model.transformer, self.config
        x = t.wte(take_cols(input_ids, cols))
        if cfg.image_pos_grid is not None:
            row, col, inside = image_position_ids(input_ids, cfg.soi_id, cfg.image_pos_grid)  # (B, L) each
            row, col, inside = (take_cols(v, cols) for v in (row, col, inside))
            x = x + (t.wpe_row(row) + t.wpe_col(col)) * inside[..., None].to(x.dtype)
        return x

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def add_rows(self, n: int, seed: int | None = None) -> "DiffusionLM":
        """Appends n ids to the embedding and the output head (e.g. an image codebook for SFT).

        Existing rows are kept, so the logits of the old ids do not change; the new rows are drawn
        from N(0, init_std). The config's vocab_size and embedding_size both become rows + n.
        """
        if n < 0:
            raise ValueError(f"n={n}: rows can only be added")
        t, cfg = self.model.transformer, self.config
        old_wte, old_head = t.wte.weight, t.ff_out.weight  # (V, D) each
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def new(w: torch.Tensor) -> torch.Tensor:  # (n, D)
            return (torch.randn(n, cfg.d_model, generator=gen) * cfg.init_std).to(w.device, w.dtype)

        rows = cfg.rows + n
        t.wte = nn.Embedding(rows, cfg.d_model, device=old_wte.device, dtype=old_wte.dtype)
        t.wte.weight.copy_(torch.cat([old_wte, new(old_wte)]))
        t.ff_out = nn.Linear(cfg.d_model, rows, bias=False, device=old_head.device, dtype=old_head.dtype)
        t.ff_out.weight.copy_(torch.cat([old_head, new(old_head)]))
        t.wte.weight.requires_grad_(old_wte.requires_grad)
        t.ff_out.weight.requires_grad_(old_head.requires_grad)
        self.config = replace(cfg, vocab_size=rows, embedding_size=rows)
        return self
