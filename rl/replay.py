"""Trajectory replay: the learner's log-probs of the tokens decoded at a sampled denoising step.

ParaRL's objective (paper §4, Eq. 3) needs, for each sampled step s of a rollout, the likelihood
ratio of the tokens decoded *at* s given the full history before it. The history is rebuilt from
the rollout's `step_map` (the step at which each output slot was decoded, recorded by
model.sampling.generate(trace=True)): since a decoded slot never changes again, the state before
step s is "every slot decoded before s, [MASK] elsewhere". One forward pass over that state, its
head run only at the slots decoded at s, and model.sampling.token_logprobs give the log-probs the
sampler used (the sampler scores what it decodes with the same functions), so at the first inner
iteration the ratio to the recorded behaviour log-probs is 1 (TraceRL's step replay; dLLM-RL
`denoise_step_map`). Pure torch: no Ray, no IO. Shapes: R rollouts, M output length, V vocab.
"""
import torch

from model.layout import IMAGE, OutputShape, left_pad, output_regions
from model.sampling import SamplerConfig, token_logprobs
from model.tokens import Vocab


def state_before(tokens: torch.Tensor, step_map: torch.Tensor, step: int | torch.Tensor, mask_id: int) -> torch.Tensor:
    """The output part just before `step`: slots decoded at or after it are masked again.

    tokens (R, M) final output parts; step_map (R, M) (-1 = sentinel, never masked); step an int
    or (R,) tensor of steps. Returns (R, M).
    """
    step = torch.as_tensor(step, device=tokens.device).view(-1, 1)  # (R or 1, 1)
    later = (step_map >= 0) & (step_map >= step)
    return tokens.masked_fill(later, mask_id)


def replay_logprobs(model, prompts: list[list[int]], tokens: torch.Tensor, step_map: torch.Tensor,
                    steps: torch.Tensor, vocab: Vocab, shape: OutputShape, cfg: SamplerConfig,
                    return_logits: bool = False):
    """Log-probs of the tokens each row decoded at its step, under `model` (with grad if enabled).

    Args:
        prompts: P prompt id lists, one per row (left-padded here as in the sampler).
        tokens: (P, M) final output parts; step_map: (P, M); steps: (P,) step to replay per row.
        cfg: the rollout's SamplerConfig (temperatures define the policy distribution).
    Returns:
        logp (P, M) float32 (0 where not credited), credited (P, M) bool = step_map == step, and the
        credited slots' logits (N, V) in credited.nonzero() order when return_logits. The head runs
        only there: a state credits about M / S slots, and (P, M, V) logits at an 8B model's 134k
        vocabulary and M = 1280 would take 0.7 GB per row in float32, before their gradient.
    """
    dev = tokens.device
    state = state_before(tokens, step_map, steps.to(dev), vocab.mask_id)  # (P, M)
    pids, pmask = left_pad(prompts, vocab.pad_id)
    ids = torch.cat([pids.to(dev), state], dim=1)
    mask = torch.cat([pmask.to(dev), torch.ones_like(state, dtype=torch.bool)], dim=1)
    credited = step_map == steps.to(dev)[:, None]  # (P, M)
    logits = model(ids, mask, last_n=shape.length, head_mask=credited)  # (N, V)
    logp = torch.zeros(credited.shape, dtype=torch.float32, device=dev)
    is_img = image_slots(shape, dev).expand(credited.shape)[credited]  # (N,)
    logp[credited] = token_logprobs(logits, tokens[credited], is_img, vocab, cfg)
    return (logp, credited, logits) if return_logits else (logp, credited)


def image_slots(shape: OutputShape, device=None) -> torch.Tensor:
    """(M,) bool: True on output image slots."""
    return torch.tensor(output_regions(shape), device=device) == IMAGE
