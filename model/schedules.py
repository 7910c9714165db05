"""The samplers' timetables (pure): LLaDA's even split of a block's tokens over its steps, the
semi-autoregressive text plan, where image steps sit on the shared timeline, and MaskGIT's cosine
count of image slots left masked (paper §3, upstream-facts §3.1-3.2)."""
import math

import torch


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
