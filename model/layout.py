"""Sequence layouts of thinking-aware editing and generation (MMaDA-Parallel-M style).

    editing:     <edit-task> <soi> IN_IMG <eoi> <bos> instruction <eos> | <soi> OUT_IMG <eoi> <bos> TEXT
    generation:  <gen-task> <bos> prompt <eos>                           | <soi> OUT_IMG <eoi> <bos> TEXT

Left of the bar is the prompt (never noised); right of it the output part, whose image and text
slots are what the model denoises in parallel. TEXT is the reasoning trace, then <eos>, padded
with <eos> to a fixed length (the pads are supervised, as upstream). The output part has a fixed
shape, so batches are left-padded and every output slot sits in the same column of every row.
Unconditional prompts for classifier-free guidance are whole prompts built without the
instruction and/or input image and concatenated with the output part (upstream overwrites the
conditional prefix in place instead, which leaves conditional tokens behind: upstream-facts §3.1a).
"""
from dataclasses import dataclass

import torch

from model.tokens import Vocab

# Region codes of a position.
PROMPT = 0  # clean conditioning, including the output part's <soi>/<eoi>/<bos> sentinels
IMAGE = 1   # output image code slot
TEXT = 2    # output text slot
PAD = 3     # left padding, never attended to


@dataclass(frozen=True)
class OutputShape:
    """Fixed shape of the output part."""

    image_tokens: int
    """Image code slots (h * w of the image tokenizer's grid)."""
    text_tokens: int
    """Text slots after the output <bos>: the trace, its <eos>, then <eos> padding."""

    @property
    def length(self) -> int:
        return self.image_tokens + self.text_tokens + 3


def output_regions(shape: OutputShape) -> list[int]:
    if hasattr(shape, "grid"):  # the A variant's layout (model/layout_dimoo.DimooOutputShape)
        from model import layout_dimoo

        return layout_dimoo.output_regions(shape)
    return [PROMPT] + [IMAGE] * shape.image_tokens + [PROMPT, PROMPT] + [TEXT] * shape.text_tokens


def output_template(vocab: Vocab, shape: OutputShape) -> list[int]:
    """The fully masked output part the sampler starts from."""
    if hasattr(shape, "grid"):  # the A variant's layout, with this vocabulary's [MASK]
        from model import layout_dimoo

        return layout_dimoo.output_template(shape, layout_dimoo.ids_for(vocab))
    return ([vocab.soi_id] + [vocab.mask_id] * shape.image_tokens + [vocab.eoi_id, vocab.bos_id]
            + [vocab.mask_id] * shape.text_tokens)


def output_target(vocab: Vocab, shape: OutputShape, image_codes: list[int], text_ids: list[int]) -> list[int]:
    """The clean output part: image ids, then the trace + <eos> padded with <eos>."""
    if len(image_codes) != shape.image_tokens:
        raise ValueError(f"got {len(image_codes)} image codes for an output of {shape.image_tokens}; "
                         f"use the image tokenizer the model was configured with")
    if len(text_ids) + 1 > shape.text_tokens:
        raise ValueError(f"trace of {len(text_ids)} tokens + <eos> exceeds text_tokens={shape.text_tokens}; "
                         f"raise text_tokens or filter long traces")
    bad = [c for c in image_codes if not 0 <= c < vocab.codebook_size]
    if bad:
        raise ValueError(f"image codes {bad[:3]} outside [0, {vocab.codebook_size})")
    text = list(text_ids) + [vocab.eos_id] * (shape.text_tokens - len(text_ids))
    return ([vocab.soi_id] + [vocab.image_id(c) for c in image_codes] + [vocab.eoi_id, vocab.bos_id] + text)


def edit_prompt(vocab: Vocab, image_codes: list[int] | None, instruction_ids: list[int] | None) -> list[int]:
    """Editing prompt; None drops the input image or the instruction (CFG / conditioning dropout)."""
    ids = [vocab.edit_task_id]
    if image_codes is not None:
        ids += [vocab.soi_id] + [vocab.image_id(c) for c in image_codes] + [vocab.eoi_id]
    return ids + [vocab.bos_id] + list(instruction_ids or []) + [vocab.eos_id]


def generation_prompt(vocab: Vocab, prompt_ids: list[int] | None) -> list[int]:
    """Generation prompt; None gives the unconditional prompt."""
    return [vocab.gen_task_id, vocab.bos_id] + list(prompt_ids or []) + [vocab.eos_id]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads rows to one length. Returns ids (B, L) long and attention mask (B, L) bool."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r):] = True
    return ids, mask


@dataclass
class Batch:
    """A left-padded batch of full sequences (prompt + output part) with their regions."""

    input_ids: torch.Tensor       # (B, L)
    attention_mask: torch.Tensor  # (B, L) bool
    regions: torch.Tensor         # (B, L) PROMPT / IMAGE / TEXT / PAD


def collate(prompts: list[list[int]], outputs: list[list[int]], shape: OutputShape, pad_id: int) -> Batch:
    """Joins each prompt with its output part and left-pads the batch."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} output parts")
    for o in outputs:
        if len(o) != shape.length:
            raise ValueError(f"output part of length {len(o)} does not match {shape}")
    ids, mask = left_pad([p + o for p, o in zip(prompts, outputs)], pad_id)
    regions = torch.full_like(ids, PAD)
    regions[mask] = PROMPT
    regions[:, -shape.length:] = torch.tensor(output_regions(shape))
    return Batch(ids, mask, regions)
