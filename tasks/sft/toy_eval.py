"""Exact evaluation on held-out toy-world tasks, and two baselines.

For N val/test samples per category: sample image + reasoning text with the parallel sampler
(model/sampling.generate), decode them (PatchVQ.decode, TextTokenizer.decode) and score exactly:
exact_image (the image parses to the true output scene), text_correct (the trace's result
phrase states it) and agreement (the trace states the scene the image shows). Baselines score
exact_image of copying the input image and of always answering the most common training output
image. Also builds toy samples-table rows in memory (toy_rows), so tests and benchmarks need no
Parquet dataset. Result rows are (method, metric, category, value, n), with category "overall"
over all evaluated samples; to_eval_results() maps them onto the eval_results table.
Leaves out: training, the Parquet pipeline, CFG (the toy recipe samples without guidance).
"""
import io
import json
from collections import Counter, defaultdict

import numpy as np
import torch

from model.layout import IMAGE, TEXT, OutputShape, output_regions
from model.sampling import SamplerConfig, generate
from model.tokens import Vocab
from tasks.sft.sft_data import SequenceConfig, TokenisedSet, build_prompt, output_shape
from tasks.toy import parse_image, render, sample_tasks, text_correct, text_image_agreement, write_trace
from tasks.toy.scene import Scene, ToyPreset, parse_description

OVERALL = "overall"
METRICS = ("exact_image", "text_correct", "agreement")


# ---------------------------------------------------------------------------------------------
# data

def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def toy_rows(preset: ToyPreset, n: int, split: str, seed: int = 0, categories: tuple[str, ...] | None = None,
             compact: bool = True, error_rate: float = 0.0) -> list[dict]:
    """n toy tasks of one split as samples-table rows (PNG images, teacher trace, task in extra_json)."""
    rows = []
    for task in sample_tasks(preset, n, split, seed, categories):
        trace = write_trace(task, preset, seed=seed, error_rate=error_rate, compact=compact)
        rows.append({"sample_id": task.sample_id, "kind": "edit" if task.input_scene is not None else "generate",
                     "category": task.category, "split": split, "instruction": task.instruction,
                     "input_image": None if task.input_scene is None else _png(render(task.input_scene, preset)),
                     "output_image": _png(render(task.output_scene, preset)), "reference_trace": trace.text,
                     "extra_json": json.dumps({"toy": task.to_dict()})})
    return rows


def toy_scenes(rows: list[dict]) -> dict[str, Scene]:
    """sample_id -> true output scene, read from the toy task dict in each row's extra_json."""
    out = {}
    for r in rows:
        task = json.loads(r.get("extra_json") or "{}").get("toy")
        if task is None:
            raise ValueError(f"sample {r['sample_id']} has no toy task in extra_json; toy_eval scores toy-world "
                             f"samples only (source type 'toy')")
        out[r["sample_id"]] = parse_description(task["output_scene"])
    return out


def select_per_category(data: TokenisedSet, n: int, categories: tuple[str, ...] | None = None) -> TokenisedSet:
    """The first n samples of each category (all categories present, or the given ones)."""
    seen: Counter = Counter()
    keep = []
    for i, c in enumerate(data.category):
        if (categories is None or c in categories) and seen[c] < n:
            seen[c] += 1
            keep.append(i)
    return data.subset(keep)


# ---------------------------------------------------------------------------------------------
# sampling and decoding

def greedy_sampler(text_tokens: int, steps: int, image_steps: int) -> SamplerConfig:
    """Deterministic parallel sampling: greedy text and image, no re-masking jitter, one text block."""
    return SamplerConfig(steps=steps, image_steps=image_steps, text_block_length=text_tokens, text_temperature=0.0,
                         image_temperature=0.0, image_noise=0.0)


@torch.no_grad()
def generate_outputs(model, data: TokenisedSet, vocab: Vocab, seq: SequenceConfig, sampler: SamplerConfig,
                     batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """Samples the output part of every sample of `data`. Returns (N, M) ids."""
    shape = _shape(data, seq)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(data), batch_size):
        prompts = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i])
                   for i in range(s, min(s + batch_size, len(data)))]
        out.append(generate(model, vocab, shape, prompts, sampler, generator=gen).tokens.cpu())
    return torch.cat(out)


def _shape(data: TokenisedSet, seq: SequenceConfig) -> OutputShape:
    return output_shape(seq, len(data.output[0]))


def decode_outputs(tokens: torch.Tensor, shape: OutputShape, vocab: Vocab, tokenizer,
                   image_tokenizer) -> tuple[torch.Tensor, list[str]]:
    """Output parts (N, M) -> uint8 images (N, H, W, 3) and texts."""
    regions = torch.tensor(output_regions(shape))
    codes = (tokens[:, regions == IMAGE] - vocab.image_offset).clamp(0, image_tokenizer.codebook_size - 1)
    images = image_tokenizer.decode(codes.view(len(tokens), *image_tokenizer.grid))  # (N, H, W, 3)
    texts = [tokenizer.decode(row.tolist()) for row in tokens[:, regions == TEXT]]
    return images, texts


# ---------------------------------------------------------------------------------------------
# scoring

def score(images, texts: list[str] | None, scenes: list[Scene], categories: list[str], preset: ToyPreset,
          method: str = "model") -> list[dict]:
    """Per-category and overall exact metrics.

    Args:
        images: N uint8 (H, W, 3) images (None entries count as wrong). texts: N traces, or None to
            score images only (baselines). scenes: N true output scenes. categories: N names.
    Returns:
        rows {method, metric, category, value, n}.
    """
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for i, (scene, cat) in enumerate(zip(scenes, categories)):
        img = images[i]
        shown = None if img is None else parse_image(np.asarray(img), preset)
        results = {"exact_image": shown is not None and shown == scene}
        if texts is not None:
            results["text_correct"] = text_correct(texts[i], scene, preset)
            results["agreement"] = img is not None and text_image_agreement(texts[i], np.asarray(img), preset)
        for metric, ok in results.items():
            hits[(metric, cat)].append(ok)
            hits[(metric, OVERALL)].append(ok)
    return [{"method": method, "metric": m, "category": c, "value": sum(v) / len(v), "n": len(v)}
            for (m, c), v in sorted(hits.items())]


def copy_input_images(data: TokenisedSet, image_tokenizer) -> list:
    """The input image of each sample (None for generation samples)."""
    h, w = image_tokenizer.grid
    return [None if c is None else image_tokenizer.decode(torch.tensor(c).view(h, w)) for c in data.input_codes]


def most_common_output_image(train: TokenisedSet, vocab: Vocab, image_tokenizer) -> torch.Tensor:
    """The most frequent output image of the training set, uint8 (H, W, 3)."""
    n_img = image_tokenizer.grid[0] * image_tokenizer.grid[1]
    ids = Counter(tuple(o[1:1 + n_img]) for o in train.output).most_common(1)[0][0]  # output part: <soi> codes...
    return image_tokenizer.decode((torch.tensor(ids) - vocab.image_offset).view(*image_tokenizer.grid))


def evaluate(model, data: TokenisedSet, scenes: dict[str, Scene], train: TokenisedSet, vocab: Vocab,
             seq: SequenceConfig, tokenizer, image_tokenizer, preset: ToyPreset, sampler: SamplerConfig,
             batch_size: int = 64, seed: int = 0, baselines: bool = True) -> list[dict]:
    """Generates for every sample of `data` and scores it, plus (optionally) both baselines.

    Args:
        data: eval samples (select_per_category of a val/test TokenisedSet). scenes: toy_scenes(rows).
        train: the training set (for the most-common-output baseline).
    Returns:
        rows {method: model | copy_input | common_output, metric, category, value, n}.
    """
    shape = _shape(data, seq)
    tokens = generate_outputs(model, data, vocab, seq, sampler, batch_size, seed)
    images, texts = decode_outputs(tokens, shape, vocab, tokenizer, image_tokenizer)
    truth = [scenes[s] for s in data.sample_id]
    rows = score(list(images), texts, truth, data.category, preset)
    if baselines:
        rows += baseline_rows(data, truth, train, vocab, image_tokenizer, preset)
    return rows


def baseline_rows(data: TokenisedSet, truth: list[Scene], train: TokenisedSet, vocab: Vocab, image_tokenizer,
                  preset: ToyPreset) -> list[dict]:
    """exact_image of the copy-input and most-common-training-output baselines."""
    common_img = most_common_output_image(train, vocab, image_tokenizer)
    rows = score(copy_input_images(data, image_tokenizer), None, truth, data.category, preset, "copy_input")
    return rows + score([common_img] * len(data), None, truth, data.category, preset, "common_output")


def table(rows: list[dict], metric: str = "exact_image") -> dict[str, dict[str, float]]:
    """{category: {method: value}} of one metric, for printing."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["metric"] == metric:
            out[r["category"]][r["method"]] = r["value"]
    return dict(out)


def to_eval_results(rows: list[dict], run_id: str, checkpoint: str, step: int | None, suite: str = "toy") -> list[dict]:
    """Rows of storage/schema.py EVAL_RESULTS: suite '<suite>/<method>', metric '<metric>/<category>'."""
    return [{"run_id": run_id, "checkpoint": checkpoint, "step": step, "suite": f"{suite}/{r['method']}",
             "metric": f"{r['metric']}/{r['category']}", "value": float(r["value"]), "num_samples": r["n"]}
            for r in rows]
