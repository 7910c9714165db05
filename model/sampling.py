"""Parallel text + image decoding with dual schedulers, its sequential baseline, and LLaDA text mode.

Parallel (paper §3, upstream-facts §3.1-3.2): one shared timeline of S steps, one forward pass
over the whole sequence per step. Text unmasks on a linear schedule in semi-autoregressive blocks
with low-confidence remasking; on a subset of steps (from S//4 to S-1) the image is re-predicted
MaskGIT-style and the least confident codes are re-masked along a cosine schedule. Because
attention is bidirectional, every step's text sees the partial image and vice versa.
Sequential: text to completion first, then the image conditioned on the finished text.
Unlike upstream, the last image step re-masks nothing, so no image slot is left masked.
Randomness comes only from the `generator` argument: same seed, same samples.
For RL (rl/), generate() also records a trajectory: the step at which every output slot was
decoded (`step_map`) and, at the recorded steps, the behaviour log-prob of each token decoded
there under the sampler's own per-modality distribution (token_logprobs), so a learner can
rebuild the state before any step and score exactly what was decided at it.
Speed (benchmarks/sampler.py): steps where nothing would change are skipped (exact); forward
passes go through model/cache.StepForward (cond + uncond rows joined; optional approximate KV
caches) and return logits only for the slots a step decides; text noise, guidance, softmax and
sampling run on those slots alone (exact: the same tokens under a seed as the plain loop in
tests/sampler_reference.py). SamplerConfig.text_threshold switches text to Fast-dLLM
confidence-threshold decoding. The approximate options are off by default.
Shapes: B rows (prompts x samples), M output length, N image slots, T text slots, V vocab.
"""
import math
from dataclasses import dataclass, field

import torch

from model.cache import ImageLogitCache, StepForward
from model.layout import IMAGE, TEXT, OutputShape, output_regions, output_template
from model.schedules import image_keep_count, image_step_indices, text_schedule
from model.tokens import Vocab


@dataclass(frozen=True)
class SamplerConfig:
    """Knobs of the parallel / sequential sampler (defaults follow the released PM inference)."""

    steps: int = 128
    """S: text steps on the shared timeline, one conditional forward pass each."""
    image_steps: int = 30
    """Image decoding events placed on the timeline (parallel) or run after the text (sequential)."""
    image_start: float = 0.25
    """Parallel mode: first image step at floor(S * image_start) (S//4 upstream)."""
    text_block_length: int = 32
    """Semi-autoregressive block length; set it to the text length for one global block."""
    text_temperature: float = 0.0
    """Gumbel temperature of text token choice; 0 is greedy."""
    image_temperature: float = 1.0
    """Temperature of image code sampling; 0 is greedy."""
    image_noise: float = 1.0
    """Scale of the annealed Gumbel jitter on image confidences before re-masking."""
    text_cfg: float = 0.0
    """Guidance scale on text logits: u + (w + 1)(c - u). 0 costs no extra pass."""
    image_cfg: float = 0.0
    """Guidance scale on image logits; extra passes only on image steps."""
    text_remasking: str = "low_confidence"
    """low_confidence (keep the most confident predictions) or random."""
    mode: str = "parallel"
    """parallel (joint timeline) or sequential (text first, then image)."""
    batch_cfg: bool = True
    """Exact: cond and uncond rows in one forward pass; False runs them as separate passes (upstream)."""
    cache: str = "none"
    """Approximate KV cache (model/cache.py): none (exact), prefix (prompt + input image cached) or
    dual (also the output slots a step does not need; Fast-dLLM DualCache). Off by default."""
    cache_refresh: int = 4
    """With a cache: a full pass every this many passes and at each new text block; 1 is exact."""
    text_threshold: float | None = None
    """Fast-dLLM confidence-aware parallel text decoding: per step commit every masked slot of the
    row's current block whose confidence exceeds it (at least one, and enough to finish the text by
    step S). Steps left with nothing to do are skipped. None (default) keeps the fixed schedule."""
    image_threshold: float | None = None
    """Confidence-aware parallel image decoding (the text threshold carried to MaskGIT steps): at an image step
    no sampled code whose probability exceeds it is re-masked, so the image can finish in fewer image steps
    than planned; image steps with nothing left are skipped. The cosine schedule still sets the slowest pace.
    None (default) keeps the fixed schedule. Approximate: benchmarks/sampler.py measures its OA change."""
    image_cache_ratio: float = 0.0
    """Lumina-DiMOO's ML-Cache on image slots (with cache='dual'; model/cache.ImageLogitCache): after the
    first 30% of the image steps (ML_CACHE_WARMUP), an image step recomputes only the (1 - ratio) least
    sure of each row's masked image slots and reuses the last logits of the others (each row runs only
    its own); refreshes and new text blocks still run full passes. 0 (default): off."""

    def __post_init__(self):
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"SamplerConfig.mode={self.mode!r}; use 'parallel' or 'sequential'")
        if self.text_remasking not in ("low_confidence", "random"):
            raise ValueError(f"SamplerConfig.text_remasking={self.text_remasking!r}; use 'low_confidence' or 'random'")
        if self.steps < 1 or self.image_steps < 1:
            raise ValueError(f"steps={self.steps} and image_steps={self.image_steps} must be >= 1")
        if self.cache not in ("none", "prefix", "dual"):
            raise ValueError(f"SamplerConfig.cache={self.cache!r}; use 'none', 'prefix' or 'dual'")
        if self.cache_refresh < 1:
            raise ValueError(f"SamplerConfig.cache_refresh={self.cache_refresh} must be >= 1 (1 = a full pass each step)")
        if self.text_threshold is not None and self.text_remasking != "low_confidence":
            raise ValueError(f"text_threshold={self.text_threshold} ranks by confidence; it needs "
                             f"text_remasking='low_confidence' (got {self.text_remasking!r})")
        for name in ("text_threshold", "image_threshold"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SamplerConfig.{name}={getattr(self, name)} is a probability; use a value in [0, 1]"
                                 f" or None for the fixed schedule")
        if not 0.0 <= self.image_cache_ratio < 1.0:
            raise ValueError(f"SamplerConfig.image_cache_ratio={self.image_cache_ratio} is the share of image slots "
                             f"whose logits are reused; use a value in [0, 1) (Lumina-DiMOO uses 0.9)")
        if self.image_cache_ratio > 0 and self.cache != "dual":
            raise ValueError(f"image_cache_ratio={self.image_cache_ratio} skips image columns of a dual-cache pass; "
                             f"set cache='dual' (got cache={self.cache!r})")
        if self.mode == "parallel" and self.image_steps > self.steps:
            raise ValueError(f"image_steps={self.image_steps} > steps={self.steps}: in parallel mode "
                             f"image steps sit on the text timeline; lower image_steps or raise steps")


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: exp(l) / (-log u)^T; argmax of it samples softmax(l / T)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------------------------------------
# steps (pure given logits)

def _columns(logits: torch.Tensor, cols: torch.Tensor | None, sub: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) over every slot, or (B, a, V) over the sorted slots `cols`: those of slots `sub`."""
    return logits[:, sub if cols is None else torch.searchsorted(cols, sub)]


def unmask_text(x: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor, k: int, mask_id: int,
                temperature: float, remasking: str, generator: torch.Generator | None,
                cols: torch.Tensor | None = None) -> torch.Tensor:
    """Commits the k best predictions among the allowed masked slots of each row.

    x (B, T) ids; logits (B, T, V), or (B, a, V) for the text slots `cols` (a,), sorted, among them every
    allowed masked slot; allowed (T,) bool (the current block). Only the slots some row may commit are
    scored (and draw noise), whichever form the logits come in. Returns new x.
    """
    if k == 0:
        return x
    eligible = (x == mask_id) & allowed[None]  # (B, T)
    sub = eligible.any(0).nonzero().squeeze(1)  # (a',) slots some row may commit
    lsub = _columns(logits, cols, sub)  # (B, a', V)
    x0 = add_gumbel_noise(lsub, temperature, generator).argmax(-1)  # (B, a')
    if remasking == "low_confidence":
        p = torch.softmax(lsub.to(torch.float64), dim=-1)
        conf = p.gather(-1, x0[..., None]).squeeze(-1)  # (B, a')
    else:
        conf = torch.rand(x0.shape, generator=generator, device=x.device, dtype=torch.float64)
    conf = conf.masked_fill(~eligible[:, sub], -math.inf)
    top, idx = conf.topk(min(k, len(sub)), dim=-1)  # (B, k)
    slots = sub[idx]  # (B, k); a row with fewer than k eligible slots leaves the others as they are
    return x.scatter(1, slots, torch.where(top > -math.inf, x0.gather(1, idx), x.gather(1, slots)))


def unmask_text_threshold(x: torch.Tensor, logits: torch.Tensor, block_length: int, threshold: float,
                          min_k: torch.Tensor, mask_id: int, temperature: float,
                          generator: torch.Generator | None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Fast-dLLM confidence-aware parallel decoding (`get_transfer_index` with a threshold).

    In each row's current block (the first with masked slots; every block when min_k covers all
    that is left) commits every prediction with confidence > threshold, and at least min_k of the
    most confident. x (B, T) ids; logits (B, T, V), or (B, a, V) for the sorted text slots `cols`
    (every masked slot among them); min_k (B,) long. Returns new x.
    """
    B, T = x.shape
    masked = x == mask_id
    block = torch.arange(T, device=x.device) // block_length  # (T,)
    first = torch.where(masked, block, T).min(dim=1).values  # (B,)
    left = masked.sum(-1)
    allowed = masked & ((block[None] == first[:, None]) | (min_k >= left)[:, None])  # (B, T)
    sub = allowed.any(0).nonzero().squeeze(1)  # (a',) slots some row may commit
    lsub = _columns(logits, cols, sub)  # (B, a', V)
    x0 = add_gumbel_noise(lsub, temperature, generator).argmax(-1)  # (B, a')
    conf = torch.softmax(lsub.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # (B, a')
    allowed = allowed[:, sub]
    conf = conf.masked_fill(~allowed, -math.inf)
    k = torch.maximum((conf > threshold).sum(-1), min_k).clamp(max=allowed.sum(-1))  # (B,)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (B, a')
    take = allowed & (rank < k[:, None])
    out = x.clone()
    out[:, sub] = torch.where(take, x0, x[:, sub])
    return out


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs (n, K) by inverting its CDF with one uniform per row: the distribution of
    torch.multinomial(probs, 1), whose exponential race draws n x K random numbers (most of an image
    step's time at 1024 codes x 8192 on a CPU). Returns (n,) long."""
    cdf = probs.double().cumsum(-1)  # (n, K)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def decode_image(codes: torch.Tensor, logits: torch.Tensor, keep: int | torch.Tensor, ratio: float,
                 cfg: SamplerConfig, generator: torch.Generator | None,
                 slots: torch.Tensor | None = None) -> torch.Tensor:
    """One MaskGIT step over image codes.

    codes (B, N) with -1 at masked slots; logits (B, N, K) over the codebook, or (B, a, K) for the sorted
    image slots `slots` (a,), every masked slot among them; keep an int or (B,) per row.
    Samples every masked slot (only those: drawing all N x K and keeping the known codes costs the same
    N x K work at every step), then re-masks the `keep` least confident of them; with
    cfg.image_threshold, never one whose probability exceeds it. Returns new codes.
    """
    B, N = codes.shape
    known = codes >= 0
    rows, cols = (~known).nonzero(as_tuple=True)  # only masked slots are drawn and scored, as upstream does
    lm = logits[rows, cols if slots is None else torch.searchsorted(slots, cols)].float()  # (n, K)
    if cfg.image_temperature > 0:
        draw = sample_categorical(torch.softmax(lm / cfg.image_temperature, dim=-1), generator)
    else:
        draw = lm.argmax(-1)  # (n,)
    sampled = codes.clone()
    sampled[rows, cols] = draw
    conf = torch.zeros(B, N, device=codes.device)  # (B, N) log-prob of each drawn code; known slots never read
    conf[rows, cols] = torch.log_softmax(lm, dim=-1).gather(-1, draw[:, None])[:, 0]
    keep = torch.as_tensor(keep, device=codes.device).expand(B)  # (B,)
    if cfg.image_threshold is not None:  # only the unsure may be re-masked
        unsure = ~known & (conf.exp() <= cfg.image_threshold)  # (B, N)
        keep = torch.minimum(keep, unsure.sum(-1))
        conf = conf.masked_fill(~unsure, math.inf)
    conf = conf + cfg.image_noise * (1 - ratio) * _gumbel(conf.shape, generator, conf.device)
    conf = conf.masked_fill(known, math.inf)
    k = int(keep.max())
    if k > 0:
        remask = conf.topk(k, dim=-1, largest=False).indices  # (B, k) least confident first
        within = torch.arange(k, device=codes.device)[None] < keep[:, None]  # (B, k) each row's first keep
        sampled = sampled.masked_fill(torch.zeros_like(known).scatter(1, remask, within), -1)
    return sampled


# ---------------------------------------------------------------------------------------------
# the samplers

def text_logits(logits: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Text-slot logits with image ids and [MASK] ruled out. (..., V) -> (..., V)."""
    out = logits.clone()
    out[..., vocab.image_offset:] = -math.inf
    out[..., vocab.mask_id] = -math.inf
    return out


def text_logprob(logits: torch.Tensor, tokens: torch.Tensor, vocab: Vocab, temperature: float) -> torch.Tensor:
    """Log-prob of text tokens (n,) under log softmax(text_logits / T) of their slots' logits (n, V):
    what the Gumbel-max of add_gumbel_noise samples. Returns (n,) float32."""
    lt = torch.log_softmax(text_logits(logits.float(), vocab) / temperature, dim=-1)  # (n, V)
    return lt.gather(-1, tokens[:, None])[:, 0]


def image_logprob(logits: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-prob of codebook codes (n,) under log softmax(codebook logits (n, K) / T). Returns (n,) float32."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, codes[:, None])[:, 0]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, is_image: torch.Tensor, vocab: Vocab,
                   cfg: "SamplerConfig") -> torch.Tensor:
    """Log-prob of each output token under the distribution the sampler draws it from.

    Text slots: text_logprob (log softmax(text_logits / text_temperature)); image slots: image_logprob
    (log softmax(codebook logits / image_temperature)). Which slots are committed at a step
    (confidence ranking) is not part of it, as in TraceRL and Mask-GRPO. Without CFG only (RL
    samples with text_cfg = image_cfg = 0). The sampler's trace scores the slots it decodes with the
    same two functions. logits (n, V) of n output slots; tokens (n,) joint ids; is_image (n,) bool.
    Returns (n,) float32.
    """
    _check_stochastic(cfg)
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    txt = ~is_image
    out[txt] = text_logprob(logits[txt], tokens[txt], vocab, cfg.text_temperature)
    codes = (tokens[is_image] - vocab.image_offset).clamp(0, vocab.codebook_size - 1)
    sl = slice(vocab.image_offset, vocab.image_offset + vocab.codebook_size)
    out[is_image] = image_logprob(logits[is_image][:, sl], codes, cfg.image_temperature)
    return out


def _check_stochastic(cfg: "SamplerConfig") -> None:
    if cfg.text_temperature <= 0 or cfg.image_temperature <= 0:
        raise ValueError(f"text_temperature={cfg.text_temperature} / image_temperature={cfg.image_temperature}: "
                         f"log-probs need a stochastic sampler; set both temperatures > 0")


@dataclass
class SampleResult:
    tokens: torch.Tensor
    """(B, M) finished output parts (ids in the joint vocabulary)."""
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    """step -> (B, M) output part after that step (steps counted over the whole run)."""
    nfe: int = 0
    """Forward passes per row, unconditional ones included."""
    step_map: torch.Tensor | None = None
    """(B, M) long: the step at which each slot was decoded; -1 for sentinels (trace=True)."""
    logp: torch.Tensor | None = None
    """(B, M) float: each slot's behaviour log-prob at the step that decoded it; NaN at sentinels (trace=True)."""
    full_passes: int = 0
    """Forward calls over the whole sequence (a joined cond + uncond pass counts once)."""
    partial_passes: int = 0
    """Forward calls over a few columns against a KV cache (SamplerConfig.cache)."""
    columns: int = 0
    """Sequence columns run through the blocks, summed over calls (a cost measure for the caches)."""


def _guided(c: torch.Tensor, u: torch.Tensor | None, w: float) -> torch.Tensor:
    return c if u is None or w == 0 else u + (w + 1) * (c - u)


@torch.no_grad()
def generate(model, vocab: Vocab, shape: OutputShape, prompts: list[list[int]], cfg: SamplerConfig,
             uncond_prompts: list[list[int]] | None = None, num_samples: int = 1,
             generator: torch.Generator | None = None, record_steps: tuple[int, ...] = (),
             trace: bool = False) -> SampleResult:
    """Samples output parts (image + reasoning text) for B prompts x G samples each.

    Args:
        prompts: B prompt id lists (model.layout.edit_prompt / generation_prompt).
        uncond_prompts: B unconditional prompts, needed when a CFG scale is > 0.
        num_samples: G samples per prompt; rows are prompt-major (row = b * G + g).
        record_steps: timeline steps after which to keep a copy of the output part.
        trace: also return step_map and every slot's behaviour log-prob at the step that decoded
            it (RL rollouts; needs temperatures > 0 and no CFG).
    Returns:
        SampleResult with tokens (B*G, M).
    """
    if (cfg.text_cfg > 0 or cfg.image_cfg > 0) and uncond_prompts is None:
        raise ValueError("text_cfg/image_cfg > 0 need uncond_prompts (see model.layout for building them)")
    if trace and (cfg.text_cfg > 0 or cfg.image_cfg > 0):
        raise ValueError(f"trace=True replays log-probs without guidance; set text_cfg=image_cfg=0 "
                         f"(got {cfg.text_cfg}, {cfg.image_cfg})")
    rep = lambda rows: [r for r in rows for _ in range(num_samples)]  # noqa: E731
    prompts, uncond_prompts = rep(prompts), rep(uncond_prompts) if uncond_prompts else None
    regions = torch.tensor(output_regions(shape))
    img_cols, txt_cols = (regions == IMAGE).nonzero().squeeze(1), (regions == TEXT).nonzero().squeeze(1)
    fwd = StepForward(model, prompts, uncond_prompts, vocab.pad_id, shape.length, cfg.cache, cfg.cache_refresh,
                      cfg.batch_cfg)
    dev = fwd.ids.device
    img_cols, txt_cols = img_cols.to(dev), txt_cols.to(dev)
    y = torch.tensor(output_template(vocab, shape), device=dev).repeat(len(prompts), 1)  # (B, M)
    codes = torch.full((len(prompts), shape.image_tokens), -1, dtype=torch.long, device=dev)  # (B, N)
    plan = _plan(cfg, shape)
    block_len = min(cfg.text_block_length, shape.text_tokens)
    result = SampleResult(tokens=y)
    if trace:
        result.step_map = torch.full(y.shape, -1, dtype=torch.long, device=dev)
        result.logp = torch.full(y.shape, math.nan, dtype=torch.float32, device=dev)
    last_block = -1
    img_sl = slice(vocab.image_offset, vocab.image_offset + vocab.codebook_size)
    ml_cache = ImageLogitCache(cfg.image_cache_ratio, sum(p[1] for p in plan), shape.image_tokens)
    if trace:
        _check_stochastic(cfg)
    for step, (text_step, image_step, ratio, last_image) in enumerate(plan):
        text_masked = y[:, txt_cols] == vocab.mask_id  # (B, T)
        in_block = _text_block(text_step, shape.text_tokens, block_len, cfg.text_threshold is not None, dev)  # (T,)
        allowed = text_masked & in_block[None]  # (B, T)
        text_now = text_step is not None and text_step[1] > 0 and bool(allowed.any())
        image_step = image_step and bool((codes < 0).any())  # an image finished early has nothing to do
        if not (text_now or image_step):  # nothing changes at this step: no pass, no random draws
            if step in record_steps:
                result.snapshots[step] = y.clone()
            continue
        before = y.clone() if trace else None
        uncond = bool((cfg.text_cfg > 0 and text_now) or (cfg.image_cfg > 0 and image_step))
        block = int(torch.where(text_masked, torch.arange(shape.text_tokens, device=dev) // block_len,
                                shape.text_tokens).min()) if text_now else last_block
        need_rows = torch.zeros(y.shape, dtype=torch.bool, device=dev)  # (B, M) slots whose logits a row reads
        if text_now:
            need_rows[:, txt_cols] = allowed
        if image_step:
            full = fwd.full_next(uncond, block != last_block)
            need_rows[:, img_cols] = ml_cache.to_recompute(codes < 0, full)
        active = torch.zeros(len(y), dtype=torch.bool, device=dev)  # (B,) rows with something to decode
        if text_now:
            active |= allowed.any(1)
        if image_step:
            active |= (codes < 0).any(1)
        c, u = fwd(y, with_uncond=uncond, need=need_rows, force_refresh=block != last_block, active=active)  # (B, A, V)
        last_block = block
        result.nfe += 2 if uncond else 1
        need = need_rows.any(0)  # (M,) the columns of c and u; a row's logits are read only where it needs them
        at = torch.zeros(shape.length, dtype=torch.long, device=dev)  # output slot -> its column in c and u
        at[need] = torch.arange(int(need.sum()), device=dev)
        if text_now:
            ts = need[txt_cols].nonzero().squeeze(1)  # (a,) text slots scored this step
            pos = at[txt_cols[ts]]
            lt = text_logits(_guided(c[:, pos], None if u is None else u[:, pos], cfg.text_cfg), vocab)  # (B, a, V)
            if cfg.text_threshold is None:
                y[:, txt_cols] = unmask_text(y[:, txt_cols], lt, in_block, text_step[1], vocab.mask_id,
                                             cfg.text_temperature, cfg.text_remasking, generator, cols=ts)
            else:
                steps_left = cfg.steps - step  # text steps are the first S of the plan in both modes
                min_k = (text_masked.sum(-1) + steps_left - 1) // steps_left  # (B,) finish by step S
                y[:, txt_cols] = unmask_text_threshold(y[:, txt_cols], lt, block_len, cfg.text_threshold,
                                                       min_k.clamp(min=1), vocab.mask_id, cfg.text_temperature,
                                                       generator, cols=ts)
        if image_step:
            computed = need[img_cols].nonzero().squeeze(1)  # (a,) image slots this pass computed
            slots = (codes < 0).any(0).nonzero().squeeze(1)  # (w,) slots some row still has masked
            pos = at[img_cols[computed]]
            lc, lu = ml_cache.image_logits(c[:, pos, img_sl], None if u is None else u[:, pos, img_sl], computed,
                                           slots, need_rows[:, img_cols[computed]])
            # (B, w, K) each; with ML-Cache skipped slots hold last logits
            li = _guided(lc, lu, cfg.image_cfg)
            keep = image_keep_count(shape.image_tokens, ratio, (codes < 0).sum(-1), last_image)  # (B,)
            codes = decode_image(codes, li, keep, ratio, cfg, generator, slots=slots)
            y[:, img_cols] = torch.where(codes >= 0, codes + vocab.image_offset, vocab.mask_id)
        if trace:  # each slot decoded now: its log-prob under the logits it was drawn from (no CFG in a trace)
            new = (before == vocab.mask_id) & (y != vocab.mask_id)  # (B, M)
            result.step_map[new] = step
            r, t = new[:, txt_cols].nonzero(as_tuple=True)
            result.logp[r, txt_cols[t]] = text_logprob(c[r, at[txt_cols[t]]], y[r, txt_cols[t]], vocab,
                                                       cfg.text_temperature)
            if image_step:
                r, i = new[:, img_cols].nonzero(as_tuple=True)
                result.logp[r, img_cols[i]] = image_logprob(lc[r, torch.searchsorted(slots, i)], codes[r, i],
                                                            cfg.image_temperature)
        if step in record_steps:
            result.snapshots[step] = y.clone()
    assert not (y[:, torch.cat([img_cols, txt_cols])] == vocab.mask_id).any(), "sampler left masked slots"
    result.tokens = y
    result.full_passes, result.partial_passes, result.columns = fwd.full_passes, fwd.partial_passes, fwd.columns
    return result


def _plan(cfg: SamplerConfig, shape: OutputShape) -> list[tuple]:
    """Per step: ((text block, tokens to unmask) or None, image step?, image ratio, last image step?)."""
    text_plan = text_schedule(shape.text_tokens, min(cfg.text_block_length, shape.text_tokens), cfg.steps)
    if cfg.mode == "parallel":
        img_steps = image_step_indices(cfg.steps, cfg.image_steps, int(cfg.steps * cfg.image_start))
        return [(text_plan[k], k in img_steps, (k + 1) / cfg.steps, k == img_steps[-1]) for k in range(cfg.steps)]
    J = cfg.image_steps
    return [(t, False, 0.0, False) for t in text_plan] + [(None, True, (j + 1) / J, j == J - 1) for j in range(J)]


def _text_block(text_step, T: int, block_len: int, dynamic: bool, device) -> torch.Tensor:
    """(T,) bool: text slots this step may commit: the planned block, or with a threshold (dynamic)
    every slot (unmask_text_threshold narrows it to each row's current block); none on image-only steps."""
    in_block = torch.zeros(T, dtype=torch.bool, device=device)
    if text_step is not None:
        in_block[slice(None) if dynamic else slice(text_step[0] * block_len, (text_step[0] + 1) * block_len)] = True
    return in_block
