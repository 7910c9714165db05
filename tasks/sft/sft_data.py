"""SFT data: samples (+ traces) -> tokenised sequences, a content-hashed cache, sharded batches.

tokenise_rows() turns samples-table rows (PNG images, instruction, reference trace) and an optional
traces table into the pieces of model/layout.py sequences: input image codes, instruction ids and
the clean output part (output image codes + trace + <eos> padding). Samples that do not fit the
layout are dropped and counted by reason (TokenisedSet.dropped), never silently.
load_or_tokenise() caches the result as one Parquet file keyed by a hash of everything it
depends on (sample ids + content hashes, the chosen trace texts, the text and image tokenizers,
the layout parameters), so an unchanged dataset is tokenised once.
epoch_batches() / batch_stream() shuffle per epoch with a seed, shard by (rank, world_size) and
apply conditioning dropout for classifier-free guidance, yielding model.layout.collate Batches.

`instruction_tokens > 0` pads every instruction with <eos> to a fixed length (as the released
PM training code pads its input text), so output image slot j sits at a fixed distance from
input image slot j in every sequence; sampling must then build prompts with build_prompt too.
Leaves out: reading Parquet datasets beyond the samples/traces tables, training, evaluation.
"""
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.layout import Batch, OutputShape, collate, edit_prompt, generation_prompt, output_target
from model.tokens import Vocab

CACHE_FORMAT = 1
CACHE_PREFIX = "sft-"
DROP_REASONS = ("no_trace", "trace_too_long", "instruction_too_long")
LAYOUTS = ("mmada", "dimoo")


@dataclass(frozen=True)
class SequenceConfig:
    """Layout parameters of the training sequences (part of the cache key)."""

    text_tokens: int = 40
    """Output text slots: trace + <eos> + <eos> padding; longer traces are dropped (counted)."""
    instruction_tokens: int = 0
    """If > 0, instructions are <eos>-padded to this many ids (fixed prompt length for edits)
    and longer ones are dropped (counted); 0 leaves prompts unpadded."""
    layout: str = "mmada"
    """mmada (model/layout.py: task tokens; ours and MMaDA-Parallel-M) or dimoo (model/layout_dimoo.py:
    system/user tags, a newline per image row; MMaDA-Parallel-A). prepare_sft sets it from the vocabulary."""
    image_grid: tuple[int, int] | None = None
    """(h, w) image code grid; prepare_sft sets it from the image tokenizer (the dimoo layout needs it)."""
    prompt_ids: dict | None = None
    """dimoo: ids of the instruction tags and the edit / generate system prompts (dimoo_prompt_ids)."""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"SequenceConfig.layout={self.layout!r}; choose one of {LAYOUTS}")
        if self.image_grid is not None:
            object.__setattr__(self, "image_grid", tuple(int(v) for v in self.image_grid))
        if self.layout == "dimoo" and (self.image_grid is None or not self.prompt_ids):
            raise ValueError("SequenceConfig(layout='dimoo') needs image_grid and prompt_ids (set by prepare_sft)")
        if self.text_tokens < 2:
            raise ValueError(f"SequenceConfig.text_tokens={self.text_tokens}; need room for a trace and its <eos>")
        if self.instruction_tokens < 0:
            raise ValueError(f"SequenceConfig.instruction_tokens={self.instruction_tokens} must be >= 0 "
                             f"(0 = no padding)")


@dataclass
class TokenisedSet:
    """Tokenised samples, one list entry per kept sample (column-wise)."""

    sample_id: list[str]
    kind: list[str]
    """'edit' or 'generate'."""
    category: list[str]
    split: list[str]
    input_codes: list[list[int] | None]
    """Input image codes (h*w, reading order); None for generation."""
    instruction: list[list[int]]
    """Instruction ids, unpadded."""
    output: list[list[int]]
    """Clean output part (model.layout.output_target), length OutputShape.length."""
    dropped: dict[str, int] = field(default_factory=dict)
    """reason -> number of samples left out (see DROP_REASONS)."""
    from_cache: bool = False
    """True when this set was read from the cache instead of tokenised."""

    def __len__(self) -> int:
        return len(self.sample_id)

    def subset(self, keep: list[int]) -> "TokenisedSet":
        cols = {k: [getattr(self, k)[i] for i in keep] for k in COLUMNS}
        return TokenisedSet(**cols, dropped=dict(self.dropped), from_cache=self.from_cache)


COLUMNS = ("sample_id", "kind", "category", "split", "input_codes", "instruction", "output")


# ---------------------------------------------------------------------------------------------
# prompts

def pad_instruction(ids: list[int] | None, seq: SequenceConfig, vocab: Vocab) -> list[int]:
    """Instruction ids, <eos>-padded to seq.instruction_tokens when that is > 0."""
    ids = list(ids or [])
    if seq.instruction_tokens and len(ids) > seq.instruction_tokens:
        raise ValueError(f"instruction of {len(ids)} ids exceeds instruction_tokens={seq.instruction_tokens}; "
                         f"raise it or drop the sample")
    return ids + [vocab.eos_id] * (max(seq.instruction_tokens - len(ids), 0))


def output_shape(seq: SequenceConfig, output_len: int | None = None):
    """The output part's shape: model.layout.OutputShape, or DimooOutputShape for the dimoo layout.
    Without seq.image_grid the M layout's image length is read off an output part's length."""
    if seq.layout == "dimoo":
        from model.layout_dimoo import DimooOutputShape

        return DimooOutputShape(grid=seq.image_grid, text_tokens=seq.text_tokens)
    n = seq.image_grid[0] * seq.image_grid[1] if seq.image_grid else output_len - seq.text_tokens - 3
    return OutputShape(image_tokens=n, text_tokens=seq.text_tokens)


def dimoo_prompt_ids(tokenizer) -> dict:
    """The dimoo layout's instruction pieces, tokenised once (stored in SequenceConfig.prompt_ids)."""
    from model import layout_dimoo as A

    tags = A.PromptTags.from_encoder(tokenizer.encode)
    return {"system_open": list(tags.system_open), "system_close": list(tags.system_close),
            "user_open": list(tags.user_open), "user_close": list(tags.user_close),
            "edit": tokenizer.encode(A.EDIT_SYSTEM_PROMPT), "generate": tokenizer.encode(A.GEN_SYSTEM_PROMPT)}


def build_prompt(vocab: Vocab, seq: SequenceConfig, input_codes: list[int] | None, instruction: list[int] | None,
                 drop_instruction: bool = False, drop_image: bool = False) -> list[int]:
    """The prompt of one sample; the drop flags build the CFG / conditioning-dropout variants.

    Editing (input_codes given): drop_instruction keeps the image and pads an empty instruction
    (dimoo: <uncondition> in place of the user text), drop_image removes the input image.
    Generation: drop_instruction gives the empty prompt.
    """
    if seq.layout == "dimoo":
        return _dimoo_prompt(vocab, seq, input_codes, None if drop_instruction else instruction, drop_image)
    text = pad_instruction(None if drop_instruction else instruction, seq, vocab)
    if input_codes is None:
        return generation_prompt(vocab, text)
    return edit_prompt(vocab, None if drop_image else input_codes, text)


def _dimoo_prompt(vocab: Vocab, seq: SequenceConfig, input_codes, user_ids, drop_image: bool) -> list[int]:
    from model import layout_dimoo as A

    p, ids = seq.prompt_ids, A.ids_for(vocab)
    tags = A.PromptTags(*(tuple(p[k]) for k in ("system_open", "system_close", "user_open", "user_close")))
    system = p["edit"] if input_codes is not None else p["generate"]
    instruction = A.instruction_ids(tags, system, None if user_ids is None else list(user_ids), ids)
    if input_codes is None:
        return A.generation_prompt(instruction)
    return A.edit_prompt(instruction, None if drop_image else input_codes, seq.image_grid, ids)


# ---------------------------------------------------------------------------------------------
# tokenisation

def pick_traces(rows: list[dict], traces: list[dict] | None = None) -> list[str | None]:
    """The trace text of each row: an 'ok' trace from the traces table if there is one (first by
    generator name), else the row's reference_trace."""
    best: dict[str, tuple[str, str]] = {}
    for t in traces or []:
        if t.get("status") == "ok" and t.get("text"):
            cur = best.get(t["sample_id"])
            if cur is None or t["generator"] < cur[0]:
                best[t["sample_id"]] = (t["generator"], t["text"])
    return [best[r["sample_id"]][1] if r["sample_id"] in best else r.get("reference_trace") for r in rows]


def _png_to_tensor(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 (H, W, 3); tasks/sft/image_codes.png_to_tensor without its Prefect import (train workers)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


def _encode_images(blobs: list[bytes], image_tokenizer) -> list[list[int]]:
    if not blobs:
        return []
    images = torch.stack([_png_to_tensor(b) for b in blobs])  # (N, H, W, 3)
    return image_tokenizer.encode(images).flatten(1).tolist()  # (N, h*w)


def tokenise_rows(rows: list[dict], texts: list[str | None], tokenizer, image_tokenizer, vocab: Vocab,
                  seq: SequenceConfig) -> TokenisedSet:
    """Samples-table rows + their trace texts -> TokenisedSet (dropping and counting misfits).

    Args:
        rows: dicts with sample_id, kind, category, split, instruction, input_image, output_image (PNG bytes).
        texts: one trace per row (pick_traces), None when the row has none.
        tokenizer: TextTokenizer (encode(str) -> ids). image_tokenizer: PatchVQ-like (encode uint8 -> codes).
    """
    shape = output_shape(replace(seq, image_grid=tuple(image_tokenizer.grid)))
    target = _target_fn(seq.layout, vocab, shape)
    dropped: Counter = Counter()
    keep = []
    for r, text in zip(rows, texts):
        if not text:
            dropped["no_trace"] += 1
            continue
        trace, instr = tokenizer.encode(text), tokenizer.encode(r["instruction"])
        if len(trace) + 1 > seq.text_tokens:
            dropped["trace_too_long"] += 1
        elif seq.instruction_tokens and len(instr) > seq.instruction_tokens:
            dropped["instruction_too_long"] += 1
        else:
            keep.append((r, trace, instr))
    out_codes = _encode_images([r["output_image"] for r, _, _ in keep], image_tokenizer)
    edits = [i for i, (r, _, _) in enumerate(keep) if r.get("input_image") is not None]
    in_codes: list[list[int] | None] = [None] * len(keep)
    for i, codes in zip(edits, _encode_images([keep[i][0]["input_image"] for i in edits], image_tokenizer)):
        in_codes[i] = codes
    return TokenisedSet(
        sample_id=[r["sample_id"] for r, _, _ in keep],
        kind=["edit" if c is not None else "generate" for c in in_codes],
        category=[r.get("category") or "" for r, _, _ in keep], split=[r.get("split") or "" for r, _, _ in keep],
        input_codes=in_codes, instruction=[instr for _, _, instr in keep],
        output=[target(oc, trace) for (_, trace, _), oc in zip(keep, out_codes)],
        dropped={k: dropped.get(k, 0) for k in DROP_REASONS})


def _target_fn(layout: str, vocab: Vocab, shape):
    """(image codes, trace ids) -> clean output part in the layout (the dimoo one ends with </answer>)."""
    if layout == "dimoo":
        from model import layout_dimoo as A

        ids = A.ids_for(vocab)
        return lambda codes, trace: A.output_target(shape, codes, list(trace) + [vocab.eos_id], ids)
    return lambda codes, trace: output_target(vocab, shape, codes, trace)


# ---------------------------------------------------------------------------------------------
# cache

def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the text tokenizer's serialised JSON (merges, vocabulary, special tokens)."""
    return hashlib.sha256(tokenizer._tok.to_str().encode()).hexdigest()


def image_tokenizer_fingerprint(image_tokenizer) -> str:
    """sha256 of an image tokenizer: a PatchVQ's codebook, patch and image size; otherwise its class,
    image size and every tensor of its state_dict (a torch module, or one at `.model`)."""
    if hasattr(image_tokenizer, "codebook") and hasattr(image_tokenizer, "patch_size"):
        h = hashlib.sha256(image_tokenizer.codebook.detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps([image_tokenizer.patch_size, list(image_tokenizer.image_size)]).encode())
        return h.hexdigest()
    module = image_tokenizer if hasattr(image_tokenizer, "state_dict") else getattr(image_tokenizer, "model")
    h = hashlib.sha256(json.dumps([type(image_tokenizer).__name__, list(image_tokenizer.image_size)]).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(rows: list[dict], texts: list[str | None], tokenizer, image_tokenizer, vocab: Vocab,
              seq: SequenceConfig) -> str:
    """Hash of every input of tokenise_rows, without decoding an image or tokenising a string."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "seq": asdict(seq), "vocab": vocab.to_dict(),
                                   "text": tokenizer_fingerprint(tokenizer),
                                   "image": image_tokenizer_fingerprint(image_tokenizer)}, sort_keys=True).encode())
    for r, t in zip(rows, texts):
        # content_hash covers instruction + pixels in the samples table; hash the raw fields otherwise
        content = r.get("content_hash") or hashlib.sha256(
            (r["instruction"]).encode() + (r.get("input_image") or b"") + r["output_image"]).hexdigest()
        h.update(json.dumps([r["sample_id"], content, r.get("category"), r.get("split"), t]).encode())
    return h.hexdigest()


def _write_cache(path: str, data: TokenisedSet, key: str) -> None:
    tbl = pa.table({"sample_id": data.sample_id, "kind": data.kind, "category": data.category, "split": data.split,
                    "input_codes": pa.array(data.input_codes, pa.list_(pa.int32())),
                    "instruction": pa.array(data.instruction, pa.list_(pa.int32())),
                    "output": pa.array(data.output, pa.list_(pa.int32()))})
    tbl = tbl.replace_schema_metadata({"parapipe.sft_cache": json.dumps({"key": key, "dropped": data.dropped})})
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(tbl, tmp, compression="zstd")
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none


def _read_cache(path: str) -> TokenisedSet:
    tbl = pq.read_table(path)
    meta = json.loads(tbl.schema.metadata[b"parapipe.sft_cache"])
    return TokenisedSet(**{c: tbl.column(c).to_pylist() for c in COLUMNS}, dropped=meta["dropped"], from_cache=True)


def load_or_tokenise(rows: list[dict], tokenizer, image_tokenizer, vocab: Vocab, seq: SequenceConfig,
                     cache_dir: str | None, traces: list[dict] | None = None) -> TokenisedSet:
    """tokenise_rows with a cache: `{cache_dir}/sft-<key>.parquet`, read when the key matches.

    Args:
        rows: samples-table rows (see tokenise_rows). traces: optional traces-table rows.
        cache_dir: folder of the cache files; None tokenises without caching.
    """
    texts = pick_traces(rows, traces)
    if cache_dir is None:
        return tokenise_rows(rows, texts, tokenizer, image_tokenizer, vocab, seq)
    key = cache_key(rows, texts, tokenizer, image_tokenizer, vocab, seq)
    path = os.path.join(cache_dir, f"{CACHE_PREFIX}{key[:32]}.parquet")
    if os.path.isfile(path):
        return _read_cache(path)
    data = tokenise_rows(rows, texts, tokenizer, image_tokenizer, vocab, seq)
    os.makedirs(cache_dir, exist_ok=True)
    _write_cache(path, data, key)
    return data


def is_toy_dataset(root: str, dataset: str) -> bool:
    """True when every sample of the dataset comes from the toy world (its exact metrics apply)."""
    from storage.parquet import read_table

    extra = read_table(root, "samples", run=dataset, columns=["extra_json"]).column("extra_json").to_pylist()
    if not extra:
        raise ValueError(f"no samples in {root!r} dataset {dataset!r}; run the aggregate flow first "
                         f"(parapipe aggregate --root {root} --dataset {dataset} --sources FILE)")
    return all('"toy"' in (e or "") for e in extra)


def read_samples(root: str, dataset: str, split: str = "train", traces_run: str | None = None,
                 categories: tuple[str, ...] | None = None,
                 kinds: tuple[str, ...] | None = None) -> tuple[list[dict], list[dict] | None]:
    """Rows of one split of a samples dataset (and the traces of a traces run) as dicts."""
    import pyarrow.compute as pc

    from storage.parquet import read_table

    cols = ["sample_id", "kind", "category", "split", "instruction", "input_image", "output_image",
            "reference_trace", "content_hash", "extra_json"]
    expr = pc.field("split") == split
    if categories:
        expr = expr & pc.field("category").isin(list(categories))
    if kinds:
        expr = expr & pc.field("kind").isin(list(kinds))
    rows = read_table(root, "samples", run=dataset, filter=expr, columns=cols).to_pylist()
    if not rows:
        chosen = "".join(f", {k}={list(v)}" for k, v in (("categories", categories), ("kinds", kinds)) if v)
        raise ValueError(f"no {split!r} samples in {root!r} dataset {dataset!r}{chosen}; run the aggregate flow "
                         f"first{', or widen the recipe selection' if chosen else ''}")
    traces = None
    if traces_run is not None:
        traces = read_table(root, "traces", run=traces_run,
                            columns=["sample_id", "generator", "text", "status"]).to_pylist()
    return rows, traces


# ---------------------------------------------------------------------------------------------
# batches

def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's sample indices for one epoch: one shared seeded permutation, rank::world_size.

    Every rank gets n // world_size indices (the permutation's tail is dropped), so data-parallel
    workers run the same number of steps; the dropped tail changes from epoch to epoch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)[: (n // world_size) * world_size]
    return perm[rank::world_size].tolist()


def dropout_flags(n: int, p: float, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent (drop_instruction, drop_image) draws with probability p for every sample of an epoch."""
    rng = np.random.default_rng([seed, epoch, 7])
    return rng.random(n) < p, rng.random(n) < p


def epoch_batches(data: TokenisedSet, vocab: Vocab, seq: SequenceConfig, batch_size: int, epoch: int, seed: int,
                  rank: int = 0, world_size: int = 1, cond_dropout: float = 0.0) -> Iterator[Batch]:
    """Full batches of one epoch for one rank (a short final batch is dropped)."""
    if batch_size < 1 or len(data) // world_size < batch_size:
        raise ValueError(f"batch_size={batch_size} needs at least {batch_size * world_size} samples for "
                         f"world_size={world_size}, have {len(data)}; lower batch_size or add data")
    shape = output_shape(seq, len(data.output[0]))
    drop_instr, drop_img = dropout_flags(len(data), cond_dropout, epoch, seed)
    order = epoch_order(len(data), epoch, seed, rank, world_size)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        prompts = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i], bool(drop_instr[i]),
                                bool(drop_img[i])) for i in idx]
        yield collate(prompts, [data.output[i] for i in idx], shape, vocab.pad_id)


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    return (n // world_size) // batch_size


def batch_stream(data: TokenisedSet, vocab: Vocab, seq: SequenceConfig, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, cond_dropout: float = 0.0, start_step: int = 0) -> Iterator[Batch]:
    """Endless batches over epochs, starting at micro-batch `start_step` (for resuming: the stream is
    a pure function of (data, seed, rank, world_size, step))."""
    per_epoch = batches_per_epoch(len(data), batch_size, world_size)
    epoch, skip = divmod(start_step, max(per_epoch, 1))
    while True:
        for i, b in enumerate(epoch_batches(data, vocab, seq, batch_size, epoch, seed, rank, world_size, cond_dropout)):
            if i >= skip:
                yield b
        epoch, skip = epoch + 1, 0
