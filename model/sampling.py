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
there under the sampler's own per-modality distribution (policy_logprobs), so a learner can
rebuild the state before any step and score exactly what was decided at it.
Speed (benchmarks/sampler.py): steps where nothing would change are skipped (exact); forward
passes go through model/cache.StepForward (cond + uncond rows joined; optional approximate KV
caches); SamplerConfig.text_threshold switches text to Fast-dLLM confidence-threshold decoding.
The approximate options are off by default. tests/sampler_reference.py keeps the plain loop.
Shapes: B rows (prompts x samples), M output length, N image slots, T text slots, V vocab.
"""
import math
from dataclasses import dataclass, field

import torch

from model.cache import ImageLogitCache, StepForward
from model.layout import IMAGE, TEXT, OutputShape, output_regions, output_template
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
    sure of each row's masked image slots and reuses the last logits of the others (a batch recomputes
    the union over its rows); refreshes and new text blocks still run full passes. 0 (default): off."""

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


# ---------------------------------------------------------------------------------------------
# schedules (pure)

def transfer_counts(n_masked: int, steps: int) -> list[int]:
    """LLaDA even split: n // steps per step, +1 on the first n % steps steps (sums to n)."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def text_schedule(text_tokens: int, block_length: int, steps: int) -> list[tuple[int, int]]:
    """Per step: (block index, tokens to unmask). Blocks are decoded left to right."""
    if text_tokens % block_length:
        raise ValueError(f"text length {text_tokens} is not a multiple of text_block_length={block_length}")
    n_blocks = text_tokens // block_length
    if steps % n_blocks:
        raise ValueError(f"steps={steps} is not a multiple of the {n_blocks} text blocks; "
                         f"choose steps divisible by text_tokens / text_block_length")
    per_block = steps // n_blocks
    return [(b, c) for b in range(n_blocks) for c in transfer_counts(block_length, per_block)]


def image_step_indices(steps: int, image_steps: int, start: int) -> list[int]:
    """Distinct timeline steps that decode the image: round(linspace(start, S-1, image_steps))."""
    grid = torch.linspace(start, steps - 1, image_steps, dtype=torch.float64).round().long()
    return sorted(set(grid.tolist()))


def image_keep_count(n_image: int, ratio: float, unknown: int | torch.Tensor, last: bool) -> torch.Tensor:
    """Image slots left masked after a step, per row: floor(N cos(pi/2 r)) clamped to [1, unknown-1].

    unknown: masked slots, an int or (B,) per row (the result has its shape). The final image step
    keeps 0 (upstream keeps 1 and fills it with a random code).
    """
    unknown = torch.as_tensor(unknown)
    if last:
        return torch.zeros_like(unknown)
    keep = math.floor(n_image * math.cos(math.pi / 2 * ratio))
    return torch.where(unknown <= 1, 0, (unknown - 1).clamp(max=keep).clamp(min=1))


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

def unmask_text(x: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor, k: int, mask_id: int,
                temperature: float, remasking: str, generator: torch.Generator | None) -> torch.Tensor:
    """Commits the k best predictions among the allowed masked slots of each row.

    x (B, T) ids; logits (B, T, V); allowed (T,) bool (the current block). Returns new x.
    """
    if k == 0:
        return x
    x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)  # (B, T)
    if remasking == "low_confidence":
        p = torch.softmax(logits.to(torch.float64), dim=-1)
        conf = p.gather(-1, x0[..., None]).squeeze(-1)  # (B, T)
    else:
        conf = torch.rand(x0.shape, generator=generator, device=x.device, dtype=torch.float64)
    eligible = (x == mask_id) & allowed[None]
    conf = conf.masked_fill(~eligible, -math.inf)
    idx = conf.topk(k, dim=-1).indices  # (B, k)
    return x.scatter(1, idx, x0.gather(1, idx))


def unmask_text_threshold(x: torch.Tensor, logits: torch.Tensor, block_length: int, threshold: float,
                          min_k: torch.Tensor, mask_id: int, temperature: float,
                          generator: torch.Generator | None) -> torch.Tensor:
    """Fast-dLLM confidence-aware parallel decoding (`get_transfer_index` with a threshold).

    In each row's current block (the first with masked slots; every block when min_k covers all
    that is left) commits every prediction with confidence > threshold, and at least min_k of the
    most confident. x (B, T) ids; logits (B, T, V); min_k (B,) long. Returns new x.
    """
    B, T = x.shape
    x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)  # (B, T)
    conf = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # (B, T)
    masked = x == mask_id
    block = torch.arange(T, device=x.device) // block_length  # (T,)
    first = torch.where(masked, block, T).min(dim=1).values  # (B,)
    left = masked.sum(-1)
    allowed = masked & ((block[None] == first[:, None]) | (min_k >= left)[:, None])
    conf = conf.masked_fill(~allowed, -math.inf)
    k = torch.maximum((conf > threshold).sum(-1), min_k).clamp(max=allowed.sum(-1))  # (B,)
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # (B, T)
    take = allowed & (rank < k[:, None])
    return torch.where(take, x0, x)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs (n, K) by inverting its CDF with one uniform per row: the distribution of
    torch.multinomial(probs, 1), whose exponential race draws n x K random numbers (most of an image
    step's time at 1024 codes x 8192 on a CPU). Returns (n,) long."""
    cdf = probs.double().cumsum(-1)  # (n, K)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def decode_image(codes: torch.Tensor, logits: torch.Tensor, keep: int | torch.Tensor, ratio: float,
                 cfg: SamplerConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One MaskGIT step over image codes.

    codes (B, N) with -1 at masked slots; logits (B, N, K) over the codebook; keep an int or (B,) per row.
    Samples every masked slot (only those: drawing all N x K and keeping the known codes costs the same
    N x K work at every step), then re-masks the `keep` least confident of them; with
    cfg.image_threshold, never one whose probability exceeds it. Returns new codes.
    """
    B, N, K = logits.shape
    known = codes >= 0
    rows, cols = (~known).nonzero(as_tuple=True)  # only masked slots are drawn and scored, as upstream does
    lm = logits[rows, cols].float()  # (n, K)
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


def policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab: Vocab, shape: OutputShape,
                    cfg: "SamplerConfig") -> torch.Tensor:
    """Log-prob of each output token under the distribution the sampler draws it from.

    Text slots: log softmax(text_logits / text_temperature) (the Gumbel-max of add_gumbel_noise
    samples exactly this); image slots: log softmax(codebook logits / image_temperature). Which
    slots are committed at a step (confidence ranking) is not part of it, as in TraceRL and
    Mask-GRPO. Without CFG only (RL samples with text_cfg = image_cfg = 0).
    logits (B, M, V) over the output part; tokens (B, M). Returns (B, M) float32, 0 at sentinels.
    """
    if cfg.text_temperature <= 0 or cfg.image_temperature <= 0:
        raise ValueError(f"text_temperature={cfg.text_temperature} / image_temperature={cfg.image_temperature}: "
                         f"log-probs need a stochastic sampler; set both temperatures > 0")
    regions = torch.tensor(output_regions(shape), device=logits.device)
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    txt, img = regions == TEXT, regions == IMAGE
    lt = torch.log_softmax(text_logits(logits[:, txt].float(), vocab) / cfg.text_temperature, dim=-1)  # (B, T, V)
    out[:, txt] = lt.gather(-1, tokens[:, txt, None]).squeeze(-1)
    sl = slice(vocab.image_offset, vocab.image_offset + vocab.codebook_size)
    li = torch.log_softmax(logits[:, img, sl].float() / cfg.image_temperature, dim=-1)  # (B, N, K)
    codes = (tokens[:, img] - vocab.image_offset).clamp(0, vocab.codebook_size - 1)
    out[:, img] = li.gather(-1, codes[..., None]).squeeze(-1)
    return out


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
    ml_cache = ImageLogitCache(cfg.image_cache_ratio, sum(p[1] for p in plan), img_cols, img_sl)
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
        uncond = (cfg.text_cfg > 0 and text_now) or (cfg.image_cfg > 0 and image_step)
        need = torch.zeros(shape.length, dtype=torch.bool, device=dev)
        if text_now:
            need[txt_cols] = allowed.any(0)
        if image_step:
            need[img_cols] = ml_cache.to_recompute(codes < 0).any(0)
        block = int(torch.where(text_masked, torch.arange(shape.text_tokens, device=dev) // block_len,
                                shape.text_tokens).min()) if text_now else last_block
        active = torch.zeros(len(y), dtype=torch.bool, device=dev)  # (B,) rows with something to decode
        if text_now:
            active |= allowed.any(1)
        if image_step:
            active |= (codes < 0).any(1)
        c, u = fwd(y, with_uncond=bool(uncond), need=need, force_refresh=block != last_block, active=active)
        last_block = block
        result.nfe += 2 if uncond else 1
        if text_now:
            lt = _guided(c[:, txt_cols], None if u is None else u[:, txt_cols], cfg.text_cfg)  # (B, T, V)
            lt = text_logits(lt, vocab)
            if cfg.text_threshold is None:
                y[:, txt_cols] = unmask_text(y[:, txt_cols], lt, in_block, text_step[1], vocab.mask_id,
                                             cfg.text_temperature, cfg.text_remasking, generator)
            else:
                steps_left = cfg.steps - step  # text steps are the first S of the plan in both modes
                min_k = (text_masked.sum(-1) + steps_left - 1) // steps_left  # (B,) finish by step S
                y[:, txt_cols] = unmask_text_threshold(y[:, txt_cols], lt, block_len, cfg.text_threshold,
                                                       min_k.clamp(min=1), vocab.mask_id, cfg.text_temperature,
                                                       generator)
        if image_step:
            lc, lu = ml_cache.image_logits(c, u, fwd.fresh[img_cols])  # (B, N, K) each; skipped slots: last logits
            if trace and cfg.image_cache_ratio > 0:
                c[:, img_cols, img_sl] = lc  # the behaviour log-probs are of the logits the codes were drawn from
            li = _guided(lc, lu, cfg.image_cfg)
            keep = image_keep_count(shape.image_tokens, ratio, (codes < 0).sum(-1), last_image)  # (B,)
            codes = decode_image(codes, li, keep, ratio, cfg, generator)
            y[:, img_cols] = torch.where(codes >= 0, codes + vocab.image_offset, vocab.mask_id)
        if trace:
            new = (before == vocab.mask_id) & (y != vocab.mask_id)  # (B, M) decoded at this step
            result.step_map[new] = step
            rows = new.any(dim=1)
            result.logp[rows] = torch.where(new[rows], policy_logprobs(c[rows], y[rows], vocab, shape, cfg),
                                            result.logp[rows])
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


@torch.no_grad()
def generate_text(model, prompt_ids: torch.Tensor, mask_id: int, gen_length: int = 128, steps: int = 128,
                  block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
                  remasking: str = "low_confidence", generator: torch.Generator | None = None) -> torch.Tensor:
    """LLaDA-compatible text generation (LLaDA generate.py): semi-AR blocks, low-confidence remasking.

    prompt_ids (B, Lp) unpadded prompts of equal length. Returns (B, Lp + gen_length).
    CFG re-masks the whole prompt for the unconditional pass: un + (w + 1)(cond - un).
    """
    B, Lp = prompt_ids.shape
    x = torch.cat([prompt_ids, torch.full((B, gen_length), mask_id, device=prompt_ids.device)], dim=1)
    plan = text_schedule(gen_length, block_length, steps)
    per_block = steps // (gen_length // block_length)
    for i, (block, _) in enumerate(plan):
        if i % per_block == 0:  # LLaDA recounts the block's masks at its first step
            counts = transfer_counts(int((x[0, Lp + block * block_length:Lp + (block + 1) * block_length]
                                          == mask_id).sum()), per_block)
        if cfg_scale > 0:
            un = x.clone()
            un[:, :Lp] = mask_id
            c, u = model(torch.cat([x, un])).float().chunk(2)
            logits = u + (cfg_scale + 1) * (c - u)
        else:
            logits = model(x).float()
        allowed = torch.zeros(gen_length, dtype=torch.bool, device=x.device)
        allowed[block * block_length:(block + 1) * block_length] = True
        x[:, Lp:] = unmask_text(x[:, Lp:], logits[:, Lp:], allowed, counts[i % per_block], mask_id,
                                temperature, remasking, generator)
    return x
