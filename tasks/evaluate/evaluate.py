"""Evaluation: sample a checkpoint's outputs for benchmark items, judge them, aggregate ParaBench tables.

sample_items() turns EvalItems into EvalOutputs with the checkpoint's own layout (model.layout or
layout_dimoo, recorded in its config) and image tokenizer: input images resized as aggregation
does, instructions tokenised, parallel or sequential decoding chosen per call, batches seeded by
(seed, batch index) so a run is reproducible. An item whose prompt cannot be built (an instruction
longer than the checkpoint's instruction slots, an undecodable input image) becomes an output with
an error, which every judge scores as failed: nothing is skipped. aggregate() averages judgments by
metric and category / kind / overall; an output the model failed to produce counts 0 on every metric
that applies, while a judgment the judge failed to give (a malformed VLM answer) is left out and
counted. PAPER_TABLE2 holds the paper's published rows for the report.
"""
import dataclasses
import io
import json
import os
from collections import defaultdict

import numpy as np
import torch

from tasks.evaluate.judges import EDIT_ONLY, METRICS, EvalItem, EvalOutput, Judgment, overall

# ParaBench, GPT-4.1 judge (paper Table 2): METRICS order, then Overall.
PAPER_TABLE2 = {
    "Bagel w/ think": (82.0, 74.5, 76.7, 63.4, 81.5, 52.9, 71.8),
    "MMaDA-Parallel w/o ParaRL": (76.5, 70.4, 70.5, 58.2, 80.5, 51.5, 67.9),
    "MMaDA-Parallel w/ ParaRL": (80.4, 71.0, 73.4, 63.2, 81.2, 59.8, 71.5),
    "MMaDA-Parallel* w/o ParaRL": (82.6, 73.7, 71.3, 64.6, 82.6, 63.3, 73.0),
    "MMaDA-Parallel* w/ ParaRL": (84.1, 76.5, 71.0, 67.8, 83.6, 68.8, 75.3),
    "GPT-4o": (92.5, 93.4, 86.2, 85.7, 88.1, 89.5, 89.2),
}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode_png(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    from tasks.aggregate.curate import resize_image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.asarray(resize_image(im.convert("RGB"), size)).copy())


def eval_layout(checkpoint: str, vocab, tokenizer, image_tokenizer, text_tokens: int | None = None):
    """The checkpoint's SequenceConfig (recorded by SFT), or one for a released folder: M layout with
    unpadded instructions, or the dimoo layout for a Lumina vocabulary; text_tokens overrides."""
    from model.checkpoint import CONFIG_FILE
    from model.tokens import LUMINA_TEXT_VOCAB_SIZE
    from tasks.sft.sft_data import SequenceConfig, dimoo_prompt_ids

    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        recorded = json.load(f).get("parapipe_sequence")
    grid = tuple(image_tokenizer.grid)
    if recorded:
        seq = SequenceConfig(**recorded)
        seq = dataclasses.replace(seq, image_grid=seq.image_grid or grid)
    elif vocab.image_offset == LUMINA_TEXT_VOCAB_SIZE:
        seq = SequenceConfig(text_tokens=256, layout="dimoo", image_grid=grid, prompt_ids=dimoo_prompt_ids(tokenizer))
    else:
        seq = SequenceConfig(text_tokens=256, image_grid=grid)
    return dataclasses.replace(seq, text_tokens=text_tokens) if text_tokens else seq


def _prompt(item: EvalItem, vocab, seq, tokenizer, image_tokenizer):
    """(prompt, uncond prompt) ids of one item; raises ValueError with the reason when it cannot be built."""
    from tasks.sft.sft_data import build_prompt

    instruction = tokenizer.encode(item.instruction)
    if seq.instruction_tokens and len(instruction) > seq.instruction_tokens:
        raise ValueError(f"instruction of {len(instruction)} tokens exceeds the checkpoint's "
                         f"instruction_tokens={seq.instruction_tokens}")
    codes = None
    if item.kind == "edit":
        if item.input_image is None:
            raise ValueError("edit item without an input image")
        image = _decode_png(item.input_image, tuple(image_tokenizer.image_size))
        codes = image_tokenizer.encode(image[None])[0].flatten().tolist()
    return (build_prompt(vocab, seq, codes, instruction),
            build_prompt(vocab, seq, codes, instruction, drop_instruction=True, drop_image=True))


@torch.no_grad()
def sample_items(checkpoint: str, items: list[EvalItem], sampler, seed: int = 0, batch_size: int = 16,
                 text_tokens: int | None = None, device: str = "cpu",
                 dtype: str = "auto") -> tuple[list[EvalOutput], list[int]]:
    """One output per item (in order) and its forward passes; failures are outputs with an error.
    device / dtype: tasks.common.generate.inference_device ("auto": cuda + bf16 when there is one)."""
    from model.checkpoint import from_pretrained
    from model.sampling import generate
    from tasks.common.generate import inference_device, load_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.pipeline.progress import bar
    from tasks.sft.sft_data import output_shape
    from tasks.sft.toy_eval import decode_outputs

    device, weights = inference_device(device, dtype)
    model, vocab = from_pretrained(checkpoint, dtype=weights, device=device)
    model.eval()
    tok, vq = TextTokenizer.load(checkpoint), load_image_tokenizer(checkpoint, device)
    if vq is None:
        raise ValueError(f"{checkpoint!r} has no image tokenizer; evaluation decodes images, add image_tokenizer/")
    seq = eval_layout(checkpoint, vocab, tok, vq, text_tokens)
    shape = output_shape(seq)
    outputs: dict[str, EvalOutput] = {}
    nfe: dict[str, int] = {}
    ready = []
    for item in items:
        try:
            ready.append((item, *_prompt(item, vocab, seq, tok, vq)))
        except ValueError as e:
            outputs[item.item_id], nfe[item.item_id] = EvalOutput(item.item_id, "", None, error=str(e)), 0
    progress = bar(f"sample {sampler.mode}", len(ready), unit="item")
    for b, start in enumerate(range(0, len(ready), batch_size)):
        chunk = ready[start:start + batch_size]
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        res = generate(model, vocab, shape, [c[1] for c in chunk], sampler, uncond_prompts=[c[2] for c in chunk],
                       generator=gen)
        images, texts = decode_outputs(res.tokens.cpu(), shape, vocab, tok, vq)
        for (item, _, _), image, text in zip(chunk, images, texts):
            outputs[item.item_id] = EvalOutput(item.item_id, text, _png(image.numpy()))
            nfe[item.item_id] = res.nfe
        progress.update(len(chunk))
    progress.close()
    return [outputs[i.item_id] for i in items], [nfe[i.item_id] for i in items]


def aggregate(items: list[EvalItem], outputs: list[EvalOutput], judgments: list[Judgment]) -> dict:
    """{group: {metric: mean}} for group in overall / kind / category, plus counts.

    Model failures (output.error or no image) count 0 on every applicable metric; judge failures are
    left out of the means and counted in judge_failed."""
    by_id = {o.item_id: o for o in outputs}
    sums: dict = defaultdict(lambda: defaultdict(list))
    counts: dict = defaultdict(lambda: {"items": 0, "model_failed": 0, "judge_failed": 0})
    for item, j in zip(items, judgments):
        out = by_id[item.item_id]
        model_failed = out.error is not None or out.image is None
        if j.failed and not model_failed:
            scores = None
        elif model_failed:
            scores = {m: (None if m in EDIT_ONLY and item.kind != "edit" else 0.0) for m in METRICS}
        else:
            scores = j.scores
        for group in ("overall", f"kind:{item.kind}", f"category:{item.category}"):
            counts[group]["items"] += 1
            counts[group]["model_failed"] += model_failed
            counts[group]["judge_failed"] += scores is None
            if scores is None:
                continue
            for m in METRICS:
                if scores.get(m) is not None:
                    sums[group][m].append(float(scores[m]))
    table = {}
    for g, metrics in sums.items():
        means = {m: sum(v) / len(v) for m, v in metrics.items() if v}
        table[g] = {**means, "overall": overall(means)}  # ParaBench's Overall: the mean of the metric means
    return {"table": table, "counts": dict(counts)}
