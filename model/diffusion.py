"""Forward (masking) process and the time-step re-weighted masked-diffusion loss (paper §3).

Only the output part is noised: at time t every output image / text slot is replaced by [MASK]
with a modality-specific probability gamma(t), the prompt stays clean. The loss is cross-entropy
at masked slots, weighted per modality: the paper's stable choice is a time-varying 1/t weight
for text (LLaDA's ELBO weight) and a constant weight for image (MMaDA's t2i loss).
`Objective` also reproduces the released variants' published objectives (upstream-facts §4):
PARALLEL_M (double cosine, text sum/(t*T), image mean over slots) and PARALLEL_A (independent
cosine draws per modality, exact counts, one pooled mean). Shapes: B batch, L length, V vocab.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.layout import IMAGE, TEXT

SCHEDULES = ("linear", "cosine", "double_cosine")
MASKINGS = ("bernoulli", "exact")
WEIGHTS = ("inverse_t", "constant")
REDUCTIONS = ("masked", "length", "length_sum")


@dataclass(frozen=True)
class Objective:
    """How the output part is noised and how the loss is weighted and normalised."""

    shared_time: bool = True
    """One t per sample for text and image (the shared timeline); False draws one per modality."""
    text_schedule: str = "linear"
    """Mask probability gamma(t) for text: linear t, cosine cos(pi/2 (1-t)), double_cosine cos(pi/2 cos(pi/2 t))."""
    image_schedule: str = "cosine"
    """Mask probability gamma(t) for image, same choices."""
    text_masking: str = "bernoulli"
    """bernoulli: each slot masked with prob gamma; exact: round(n * gamma) uniformly chosen slots."""
    image_masking: str = "exact"
    """As text_masking, for image slots."""
    text_weight: str = "inverse_t"
    """Per-token weight of text CE: inverse_t (1/t) or constant (1)."""
    image_weight: str = "constant"
    """Per-token weight of image CE."""
    text_reduction: str = "length"
    """masked: mean over masked tokens; length: per-sample sum / region length, mean over batch;
    length_sum: the same, summed over the batch (PM's text loss)."""
    image_reduction: str = "masked"
    """As text_reduction, for image."""
    pooled: bool = False
    """Optimise one mean over all masked tokens of both modalities (PA); parts are still reported."""
    text_coeff: float = 1.0
    """Coefficient of the text loss in the total."""
    image_coeff: float = 1.0
    """Coefficient of the image loss in the total."""
    min_masked: int = 1
    """Floor of the exact mask count, so every sample trains on at least this many slots."""
    eps: float = 1e-3
    """t ~ U(eps, 1), keeping 1/t finite."""

    def __post_init__(self):
        for name, allowed in (("text_schedule", SCHEDULES), ("image_schedule", SCHEDULES),
                              ("text_masking", MASKINGS), ("image_masking", MASKINGS),
                              ("text_weight", WEIGHTS), ("image_weight", WEIGHTS),
                              ("text_reduction", REDUCTIONS), ("image_reduction", REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Objective.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if not 0 < self.eps < 1:
            raise ValueError(f"Objective.eps={self.eps} must lie in (0, 1)")


PAPER = Objective()
PARALLEL_M = Objective(text_schedule="double_cosine", image_schedule="double_cosine", min_masked=0,
                       text_reduction="length_sum", image_reduction="length")
PARALLEL_A = Objective(shared_time=False, text_schedule="cosine", text_masking="exact",
                       text_weight="constant", pooled=True, text_reduction="masked")


def mask_probability(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """gamma(t), increasing from ~0 at t=0 to 1 at t=1. t (B,) -> (B,)."""
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * (1 - t))
    return torch.cos(math.pi / 2 * torch.cos(math.pi / 2 * t))


def _mask_region(region: torch.Tensor, p: torch.Tensor, masking: str, min_masked: int,
                 gen: torch.Generator | None) -> torch.Tensor:
    """region (B, L) bool, p (B,) -> masked (B, L) bool inside the region."""
    u = torch.rand(region.shape, generator=gen, device=region.device)
    if masking == "bernoulli":
        return region & (u < p[:, None])
    n = region.sum(-1)  # (B,)
    count = torch.round(n * p).long().clamp(min=min_masked).minimum(n)
    u = u.masked_fill(~region, 2.0)  # outside the region sorts last
    rank = u.argsort(-1).argsort(-1)  # (B, L) rank of each slot's score
    return region & (rank < count[:, None])


def forward_process(input_ids: torch.Tensor, regions: torch.Tensor, objective: Objective, mask_id: int,
                    generator: torch.Generator | None = None):
    """Masks the output part of clean sequences.

    Args:
        input_ids: (B, L) clean token ids.
        regions: (B, L) region codes from model.layout.
    Returns:
        noisy (B, L) ids, masked (B, L) bool, t_text (B,), t_image (B,).
    """
    B, dev = input_ids.shape[0], input_ids.device
    eps = objective.eps
    t_text = torch.rand(B, generator=generator, device=dev) * (1 - eps) + eps
    t_image = t_text if objective.shared_time else torch.rand(B, generator=generator, device=dev) * (1 - eps) + eps
    masked = _mask_region(regions == TEXT, mask_probability(t_text, objective.text_schedule),
                          objective.text_masking, objective.min_masked, generator)
    masked |= _mask_region(regions == IMAGE, mask_probability(t_image, objective.image_schedule),
                           objective.image_masking, objective.min_masked, generator)
    return input_ids.masked_fill(masked, mask_id), masked, t_text, t_image


def _reduce(ce: torch.Tensor, masked: torch.Tensor, region: torch.Tensor, weight: torch.Tensor,
            reduction: str) -> torch.Tensor:
    """ce, masked, region (B, L); weight (B,) -> scalar."""
    per_token = ce * masked * weight[:, None]  # (B, L)
    if reduction == "masked":
        return per_token.sum() / masked.sum().clamp(min=1)
    per_sample = per_token.sum(-1) / region.sum(-1).clamp(min=1)  # (B,)
    return per_sample.mean() if reduction == "length" else per_sample.sum()


@dataclass
class LossParts:
    total: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, regions: torch.Tensor,
                   t_text: torch.Tensor, t_image: torch.Tensor, objective: Objective) -> LossParts:
    """Time-step re-weighted CE over masked output slots.

    Args:
        logits: (B, L, V) predictions on the noisy sequence.
        targets: (B, L) clean ids. masked, regions: (B, L). t_text, t_image: (B,).
    """
    ce = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # (B, L)
    ce[masked] = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    text_region, image_region = regions == TEXT, regions == IMAGE
    text_m, image_m = masked & text_region, masked & image_region
    w_text = 1 / t_text if objective.text_weight == "inverse_t" else torch.ones_like(t_text)
    w_image = 1 / t_image if objective.image_weight == "inverse_t" else torch.ones_like(t_image)
    text = _reduce(ce, text_m, text_region, w_text, objective.text_reduction)
    image = _reduce(ce, image_m, image_region, w_image, objective.image_reduction)
    if objective.pooled:
        weighted = ce * (text_m * w_text[:, None] + image_m * w_image[:, None])
        total = weighted.sum() / masked.sum().clamp(min=1)
    else:
        total = objective.text_coeff * text + objective.image_coeff * image
    return LossParts(total, text, image)
