"""The parallel / sequential sampler as it was before the fast paths (model/cache.py, thresholds):
one full forward pass per step, cond + uncond rows in one batch. Kept word for word as the
reference the exact fast modes must reproduce token for token (tests/test_fast_sampling.py)."""
import math

import torch

from model.layout import IMAGE, TEXT, OutputShape, left_pad, output_regions, output_template
from model.tokens import Vocab
from model.sampling import SampleResult, SamplerConfig, _guided, decode_image, text_logits, token_logprobs, unmask_text
from model.schedules import image_keep_count, image_step_indices, text_schedule


class _Forward:
    """Runs the model on prompt + output part; joins cond and uncond rows in one pass."""

    def __init__(self, model, prompts, uncond_prompts, pad_id: int, M: int):
        self.model, self.M = model, M
        dev = next(model.parameters()).device
        rows = prompts + (uncond_prompts or [])
        ids, mask = left_pad(rows, pad_id)
        self.ids, self.mask, self.B = ids.to(dev), mask.to(dev), len(prompts)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, with_uncond: bool):
        k = 2 if with_uncond else 1
        ids = torch.cat([self.ids[:k * self.B], y.repeat(k, 1)], dim=1)
        mask = torch.cat([self.mask[:k * self.B], torch.ones(ids.shape[0], self.M, dtype=torch.bool,
                                                             device=ids.device)], dim=1)
        logits = self.model(ids, mask, last_n=self.M).float()  # (k*B, M, V)
        return (logits[:self.B], logits[self.B:]) if with_uncond else (logits, None)


def policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab: Vocab, shape: OutputShape,
                    cfg: "SamplerConfig") -> torch.Tensor:
    """The plain loop's behaviour log-probs: token_logprobs of every text and image slot of a full pass.
    logits (B, M, V) over the output part; tokens (B, M). Returns (B, M) float32, 0 at sentinels."""
    regions = torch.tensor(output_regions(shape), device=logits.device).expand(tokens.shape)  # (B, M)
    slots = (regions == TEXT) | (regions == IMAGE)
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    out[slots] = token_logprobs(logits[slots], tokens[slots], regions[slots] == IMAGE, vocab, cfg)
    return out


@torch.no_grad()
def reference_generate(model, vocab: Vocab, shape: OutputShape, prompts: list[list[int]], cfg: SamplerConfig,
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
    fwd = _Forward(model, prompts, uncond_prompts, vocab.pad_id, shape.length)
    dev = fwd.ids.device
    img_cols, txt_cols = img_cols.to(dev), txt_cols.to(dev)
    y = torch.tensor(output_template(vocab, shape), device=dev).repeat(len(prompts), 1)  # (B, M)
    codes = torch.full((len(prompts), shape.image_tokens), -1, dtype=torch.long, device=dev)  # (B, N)
    text_plan = text_schedule(shape.text_tokens, min(cfg.text_block_length, shape.text_tokens), cfg.steps)
    if cfg.mode == "parallel":
        img_steps = image_step_indices(cfg.steps, cfg.image_steps, int(cfg.steps * cfg.image_start))
        plan = [(text_plan[k], k in img_steps, (k + 1) / cfg.steps, k == img_steps[-1]) for k in range(cfg.steps)]
    else:
        J = cfg.image_steps
        plan = [(t, False, 0.0, False) for t in text_plan] + [(None, True, (j + 1) / J, j == J - 1) for j in range(J)]
    block_len = min(cfg.text_block_length, shape.text_tokens)
    result = SampleResult(tokens=y)
    if trace:
        result.step_map = torch.full(y.shape, -1, dtype=torch.long, device=dev)
        result.logp = torch.full(y.shape, math.nan, dtype=torch.float32, device=dev)
    for step, (text_step, image_step, ratio, last_image) in enumerate(plan):
        before = y.clone() if trace else None
        uncond = (cfg.text_cfg > 0 and text_step is not None) or (cfg.image_cfg > 0 and image_step)
        c, u = fwd(y, with_uncond=bool(uncond))
        result.nfe += 2 if uncond else 1
        if text_step is not None:
            block, k = text_step
            lt = _guided(c[:, txt_cols], None if u is None else u[:, txt_cols], cfg.text_cfg)  # (B, T, V)
            lt = text_logits(lt, vocab)
            allowed = torch.zeros(shape.text_tokens, dtype=torch.bool, device=dev)
            allowed[block * block_len:(block + 1) * block_len] = True
            y[:, txt_cols] = unmask_text(y[:, txt_cols], lt, allowed, k, vocab.mask_id, cfg.text_temperature,
                                         cfg.text_remasking, generator)
        if image_step:
            sl = slice(vocab.image_offset, vocab.image_offset + vocab.codebook_size)
            li = _guided(c[:, img_cols, sl], None if u is None else u[:, img_cols, sl], cfg.image_cfg)  # (B, N, K)
            unknown = int((codes[0] < 0).sum())
            keep = image_keep_count(shape.image_tokens, ratio, unknown, last_image)
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
    return result

