"""LLaDA's text-only sampler (its generate.py), for text-only checkpoints and as a check of the shared
step function: semi-autoregressive blocks, low-confidence remasking, optional CFG."""
import torch

from model.sampling import unmask_text
from model.schedules import text_schedule, transfer_counts


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
