"""The items every evaluation run scores: a pinned toy ParaBench, the real ParaBench from a local folder, and storage.

Holds: `build_toy_parabench` (300 held-out toy items shaped like ParaBench: 200 edits, 20 per toy edit category, and
100 generations), `read_parabench` (the real benchmark from a local copy of its Hugging Face dataset, with a column
mapping), `write_benchmark` / `read_benchmark` (one Parquet file per named benchmark) and `benchmark_fingerprint`.
Leaves out: sampling model outputs and judging them (tasks/evaluate/judges.py), any download (fetch ParaBench once,
by hand).

Identity. An item's id is a content hash of what a judge sees (kind, category, instruction, the pixels of its images,
reference text), so the same item gets the same id on every machine and in every process. Hashes cover decoded
pixels, not PNG bytes, so a different zlib or Pillow PNG encoder does not change an id. The fingerprint of a benchmark
hashes its items in order, extras included; two runs compare only when their fingerprints match.

Storage. storage/parquet.py writes only tables declared in storage/schema.py, which this module may not change, so a
benchmark is a plain Parquet file `{root}/benchmarks/{name}.parquet` (local or S3, written atomically with
storage/fs.py), stamped with `parapipe.table=benchmarks`, a schema version and its fingerprint in the schema
metadata, like the declared tables. A benchmark is immutable: writing other items under an existing name raises
unless overwrite=True, and reading re-checks the fingerprint.
"""
import glob
import hashlib
import io
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from storage import fs
from storage.parquet import COMPRESSION, SchemaError
from storage.schema import META_TABLE, META_VERSION
from tasks.evaluate.judges import EvalItem
from tasks.toy.render import render
from tasks.toy.scene import PRESETS, describe
from tasks.toy.tasks import EDIT_CATEGORIES, GENERATION_CATEGORIES, ToyTask, sample_tasks
from tasks.toy.teacher import write_trace

KINDS = ("edit", "generate")
ID_CHARS = 16  # hex characters of an item id (64 bits; collisions are negligible at benchmark sizes)

# --- toy ParaBench ----------------------------------------------------------------------------------
PINNED_SEED = 2511  # arXiv 2511.09611; changing it changes every toy item and the fingerprint
TOY_SPLIT = "test"  # held out: toy training data is drawn from "train" only, and splits never share a task
TOY_EDITS_PER_CATEGORY = 20  # x 10 toy edit categories = ParaBench's 200 edits
TOY_GENERATIONS = 100  # ParaBench's 100 generation prompts

# --- storage --------------------------------------------------------------------------------------------
BENCHMARK_TABLE = "benchmarks"
BENCHMARK_VERSION = 1
META_FINGERPRINT = b"parapipe.fingerprint"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BENCHMARK_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),           # "edit" | "generate"
    pa.field("category", pa.string(), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("input_image", pa.binary()),                    # PNG bytes; null for generation
    pa.field("target_image", pa.binary()),                   # PNG bytes of a reference output, if any
    pa.field("reference_text", pa.string()),
    pa.field("extra_json", pa.string(), nullable=False),     # EvalItem.extra, JSON with sorted keys
], metadata={META_TABLE: BENCHMARK_TABLE.encode(), META_VERSION: str(BENCHMARK_VERSION).encode()})

# --- real ParaBench ---------------------------------------------------------------------------------
PARABENCH_REPO = "tyfeld/ParaBench"  # Hugging Face dataset id (linked from the MMaDA-Parallel README)
PARABENCH_COLUMNS = {
    "instruction": ("instruction", "edit_instruction", "prompt", "input_text"),
    "input_image": ("input_image", "image", "source_image"),
    "category": ("category", "edit_type", "task_category"),
    "kind": ("task_type", "kind", "type"),
    "target_image": ("output_image", "target_image", "edited_image"),
    "reference_text": ("reference_text", "output_text", "reasoning"),
    "source_id": ("id", "idx", "index", "original_index"),
}
"""Our field -> candidate column names, first present wins. Which names ParaBench really uses is NOT verified (see
read_parabench); the candidates follow the HF conventions of the MMaDA-Parallel authors' other datasets."""
DEMANDED_FIELDS = ("instruction", "input_image", "category")
"""Fields whose absence is an error unless columns maps them to None (instruction cannot be None)."""
KIND_ALIASES = {"edit": "edit", "editing": "edit", "image_editing": "edit", "ti2ti": "edit", "generate": "generate",
                "generation": "generate", "image_generation": "generate", "t2i": "generate",
                "text_to_image": "generate"}
NOT_RECORD_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


# =============================================================================== hashing and images

def _png(image: Image.Image) -> bytes:
    """RGB PNG bytes; Pillow's PNG encoder is deterministic for a given image and Pillow/zlib build."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _pixel_digest(png: bytes | None) -> str | None:
    """sha256 of the decoded pixels (mode, size, raw bytes), or None without an image."""
    if png is None:
        return None
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return hashlib.sha256(f"{im.mode} {im.width}x{im.height}\n".encode() + im.tobytes()).hexdigest()


def item_content_id(kind: str, category: str, instruction: str, input_image: bytes | None,
                    target_image: bytes | None, reference_text: str | None) -> str:
    """The item id: a hash of what a judge sees (images by their pixels); extras are left out."""
    parts = [kind, category, instruction, _pixel_digest(input_image), _pixel_digest(target_image), reference_text]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:ID_CHARS]


def benchmark_fingerprint(items: list[EvalItem]) -> str:
    """sha256 over the items in order: ids, texts, image pixels and extras. Equal fingerprints = same benchmark."""
    h = hashlib.sha256()
    for it in items:
        row = [it.item_id, it.kind, it.category, it.instruction, _pixel_digest(it.input_image),
               _pixel_digest(it.target_image), it.reference_text, it.extra]
        h.update(json.dumps(row, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


toy_parabench_fingerprint = benchmark_fingerprint  # the toy benchmark's name for it; one implementation


# =============================================================================== toy ParaBench

def _toy_item(task: ToyTask, seed: int) -> EvalItem:
    preset = PRESETS[task.preset]
    kind = "generate" if task.input_scene is None else "edit"
    input_png = None if task.input_scene is None else _png(Image.fromarray(render(task.input_scene, preset)))
    target_png = _png(Image.fromarray(render(task.output_scene, preset)))
    reference = write_trace(task, preset, seed=seed).text  # the teacher's error-free full trace
    extra = {"input_scene": None if task.input_scene is None else describe(task.input_scene),
             "output_scene": describe(task.output_scene), "preset": preset.name}
    return EvalItem(item_id=item_content_id(kind, task.category, task.instruction, input_png, target_png, reference),
                    kind=kind, category=task.category, instruction=task.instruction, input_image=input_png,
                    target_image=target_png, reference_text=reference, extra=extra)


def build_toy_parabench(preset: str = "tiny", seed: int = PINNED_SEED) -> list[EvalItem]:
    """The toy ParaBench: 200 edits (20 per toy edit category, round-robin) then 100 generations, all held out.

    Args:
        preset: a key of tasks.toy.scene.PRESETS.
        seed: sampling seed; keep PINNED_SEED so every run scores the same items.
    Returns:
        300 EvalItems drawn from the "test" split, which no toy training run draws from; deterministic in
        (preset, seed), byte for byte, in any process.
    """
    if preset not in PRESETS:
        raise ValueError(f"toy preset {preset!r} is unknown; use one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    edits = sample_tasks(p, TOY_EDITS_PER_CATEGORY * len(EDIT_CATEGORIES), TOY_SPLIT, seed, EDIT_CATEGORIES)
    generations = sample_tasks(p, TOY_GENERATIONS, TOY_SPLIT, seed, GENERATION_CATEGORIES)
    return [_toy_item(task, seed) for task in edits + generations]


# =============================================================================== storage

def benchmark_uri(root: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"benchmark name {name!r} is not a valid file name; use letters, digits, '.', '_' or '-' "
                         f"(e.g. 'toy-parabench-tiny')")
    return fs.join(root, BENCHMARK_TABLE, f"{name}.parquet")


def _check_items(items: list[EvalItem]) -> None:
    if not items:
        raise ValueError("a benchmark needs at least one item")
    seen = {}
    for i, it in enumerate(items):
        if it.kind not in KINDS:
            raise ValueError(f"item {i} ({it.item_id}) has kind {it.kind!r}; use one of {KINDS}")
        if it.kind == "edit" and it.input_image is None:
            raise ValueError(f"item {i} ({it.item_id}) is an edit without an input image")
        if not it.instruction:
            raise ValueError(f"item {i} ({it.item_id}) has an empty instruction")
        if it.item_id in seen:
            raise ValueError(f"items {seen[it.item_id]} and {i} share item_id {it.item_id!r}; ids must be distinct")
        seen[it.item_id] = i


def _stored_fingerprint(uri: str, s3: fs.S3Config | None) -> str | None:
    filesystem, path = fs.resolve(uri, s3)
    with filesystem.open_input_file(path) as f:
        meta = pq.read_schema(f).metadata or {}
    return meta[META_FINGERPRINT].decode() if META_FINGERPRINT in meta else None


def write_benchmark(root: str, name: str, items: list[EvalItem], overwrite: bool = False,
                    s3: fs.S3Config | None = None) -> str:
    """Store `items` as `{root}/benchmarks/{name}.parquet`; returns its URI.

    Writing the same items again is a no-op; other items under an existing name raise unless overwrite=True.
    """
    uri = benchmark_uri(root, name)
    _check_items(items)
    fingerprint = benchmark_fingerprint(items)
    if fs.exists(uri, s3) and not overwrite:
        stored = _stored_fingerprint(uri, s3)
        if stored == fingerprint:
            return uri
        raise ValueError(f"benchmark {name!r} at {uri} already holds other items (fingerprint {stored}, new "
                         f"{fingerprint}); write under a new name, or pass overwrite=True (scores of runs on the old "
                         f"items then no longer compare with new ones)")
    rows = [{"item_id": it.item_id, "kind": it.kind, "category": it.category, "instruction": it.instruction,
             "input_image": it.input_image, "target_image": it.target_image, "reference_text": it.reference_text,
             "extra_json": json.dumps(it.extra, sort_keys=True)} for it in items]
    schema = BENCHMARK_SCHEMA.with_metadata({**BENCHMARK_SCHEMA.metadata, META_FINGERPRINT: fingerprint.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression=COMPRESSION)
    fs.write_bytes(uri, sink.getvalue(), s3)
    return uri


def read_benchmark(root: str, name: str, s3: fs.S3Config | None = None) -> list[EvalItem]:
    """The items stored under `name`, in order; raises if the file is not a benchmark or its content was altered."""
    uri = benchmark_uri(root, name)
    if not fs.exists(uri, s3):
        raise FileNotFoundError(f"no benchmark {name!r} at {uri}; create it once, e.g. write_benchmark(root, {name!r}, "
                                f"build_toy_parabench()) or write_benchmark(root, {name!r}, read_parabench(folder))")
    filesystem, path = fs.resolve(uri, s3)
    with filesystem.open_input_file(path) as f:
        table = pq.read_table(f)
    meta = table.schema.metadata or {}
    if meta.get(META_TABLE) != BENCHMARK_TABLE.encode() or meta.get(META_VERSION) != str(BENCHMARK_VERSION).encode():
        raise SchemaError(f"{uri} is not a version-{BENCHMARK_VERSION} benchmark file (table={meta.get(META_TABLE)}, "
                          f"version={meta.get(META_VERSION)}); rewrite it with write_benchmark")
    items = [EvalItem(**{k: v for k, v in row.items() if k != "extra_json"}, extra=json.loads(row["extra_json"]))
             for row in table.select(BENCHMARK_SCHEMA.names).to_pylist()]
    if benchmark_fingerprint(items).encode() != meta.get(META_FINGERPRINT):
        raise SchemaError(f"{uri}: its items no longer match the fingerprint stored when it was written; the file was "
                          f"altered: rebuild it with write_benchmark(..., overwrite=True)")
    return items


# =============================================================================== real ParaBench

def _record_files(folder: str) -> list[str]:
    """Parquet shards anywhere under folder (the HF layout), else JSON / JSONL record files; hidden dirs skipped."""
    def visible(path: str) -> bool:
        parts = os.path.relpath(path, folder).split(os.sep)
        return not any(part.startswith(".") for part in parts) and parts[-1] not in NOT_RECORD_FILES

    def find(pattern: str) -> list[str]:
        return sorted(filter(visible, glob.glob(os.path.join(folder, "**", pattern), recursive=True)))
    return find("*.parquet") or find("*.jsonl") + find("*.json")


def _read_records(path: str, columns: list[str] | None = None) -> list[dict]:
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        keep = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=keep).to_pylist()
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; a ParaBench record file holds a list of objects "
                         f"(or one object per line in a .jsonl file)")
    return data


def _column_names(path: str) -> set[str]:
    if path.endswith(".parquet"):
        return set(pq.read_schema(path).names)
    return {k for rec in _read_records(path) for k in rec}


def _resolve_columns(folder: str, present: set[str], columns: dict) -> dict[str, str | None]:
    unknown = set(columns) - set(PARABENCH_COLUMNS)
    if unknown:
        raise ValueError(f"columns has unknown fields {sorted(unknown)}; map any of {list(PARABENCH_COLUMNS)}")
    if "instruction" in columns and columns["instruction"] is None:
        raise ValueError("columns={'instruction': None}: every ParaBench item needs an instruction; name its column")
    resolved = {}
    for field, candidates in PARABENCH_COLUMNS.items():
        if field in columns and columns[field] is None:
            resolved[field] = None
            continue
        tried = (columns[field],) if field in columns else candidates
        found = next((c for c in tried if c in present), None)
        if found is None and (field in columns or field in DEMANDED_FIELDS):
            opt_out = "" if field == "instruction" else f", or columns={{{field!r}: None}} if it has no {field}"
            raise ValueError(f"ParaBench folder {folder!r} has no column for {field!r} (looked for {list(tried)}); its "
                             f"files have columns {sorted(present)}. Pass read_parabench(folder, "
                             f"columns={{{field!r}: '<their column>'}}){opt_out}")
        resolved[field] = found
    return resolved


def _image_png(value, where: str, column: str, base_dirs: tuple[str, ...]) -> bytes | None:
    """PNG bytes from an HF Image struct {bytes, path}, raw bytes or a path (relative to base_dirs); None if empty."""
    data, path = None, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        path = value
    elif value is not None:
        raise ValueError(f"{where}: column {column!r} holds a {type(value).__name__}; expected an image struct "
                         f"{{'bytes', 'path'}}, bytes or a file path")
    if not data and path:
        full = next((p for p in [path] + [os.path.join(d, path) for d in base_dirs] if os.path.isfile(p)), None)
        if full is None:
            raise FileNotFoundError(f"{where}: column {column!r} names image {path!r}, found neither as given nor "
                                    f"under {list(base_dirs)}; copy the images into the folder")
        with open(full, "rb") as f:
            data = f.read()
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _png(im)
    except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) on non-images
        raise ValueError(f"{where}: column {column!r} holds no decodable image ({e})") from e


def _kind(value, has_input: bool, where: str, column: str | None) -> str:
    if column is None or value is None:
        return "edit" if has_input else "generate"
    kind = KIND_ALIASES.get(str(value).strip().lower().replace("-", "_").replace(" ", "_"))
    if kind is None:
        raise ValueError(f"{where}: column {column!r} = {value!r} is not a known task type {sorted(KIND_ALIASES)}; "
                         f"map it with columns={{'kind': None}} to infer edit / generate from the input image")
    if (kind == "edit") != has_input:
        raise ValueError(f"{where}: column {column!r} says {value!r} but the item {'has' if has_input else 'lacks'} "
                         f"an input image; fix the row or map columns={{'kind': None}}")
    return kind


def _parabench_item(row: dict, cols: dict[str, str | None], where: str, base_dirs: tuple[str, ...]) -> EvalItem:
    def get(field):
        return row.get(cols[field]) if cols[field] else None
    instruction = get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: column {cols['instruction']!r} is empty; every item needs an instruction")
    instruction = instruction.strip()
    input_png = _image_png(get("input_image"), where, cols["input_image"], base_dirs)
    target_png = _image_png(get("target_image"), where, cols["target_image"], base_dirs)
    kind = _kind(get("kind"), input_png is not None, where, cols["kind"])
    category = str(get("category") or "").strip() or kind  # generation rows may leave category empty
    reference = get("reference_text") or None
    extra = {"source": PARABENCH_REPO, "source_ref": where}
    if get("source_id") is not None:
        extra["source_id"] = str(get("source_id"))
    return EvalItem(item_id=item_content_id(kind, category, instruction, input_png, target_png, reference), kind=kind,
                    category=category, instruction=instruction, input_image=input_png, target_image=target_png,
                    reference_text=reference, extra=extra)


def read_parabench(folder: str, columns: dict[str, str | None] | None = None) -> list[EvalItem]:
    """ParaBench from a local copy of its Hugging Face dataset (nothing is downloaded here).

    Verified (public sources): the dataset id is `tyfeld/ParaBench` (README of github.com/tyfeld/MMaDA-Parallel); it
    holds 300 prompts, 200 editing and 100 generation, edits spanning add / remove / replace and reasoning tasks
    (MMaDA-Parallel paper, arXiv 2511.09611). `push_to_hub` writes `data/{split}-00000-of-0000N.parquet` and stores
    an Image feature as a struct {bytes: binary, path: string}; the authors' dataset tyfeld/processed uses exactly
    that, with columns category, edit_instruction, input_image, output_image, original_index, and their
    pre-tokenizer reads input_image / output_image / input_text / prompt / instruction.
    Assumed (the ParaBench card and files were not readable): its column names; whether the task type is a column
    (if absent, an item with an input image is an edit, else a generation); whether it ships reference outputs. The
    defaults in PARABENCH_COLUMNS try the names above; `columns` overrides any field.

    Layouts read: Parquet shards anywhere under `folder` (e.g. data/test-00000-of-00001.parquet), else .jsonl / .json
    record files whose image fields are paths relative to the record file or to `folder`. Every file is read, in
    sorted path order; images are decoded and re-encoded as RGB PNG.

    Args:
        folder: e.g. the `--local-dir` of `hf download tyfeld/ParaBench --repo-type dataset --local-dir <folder>`.
        columns: our field -> their column, for any of PARABENCH_COLUMNS' fields; None for a field the benchmark
            lacks (input_image: all generations; category: the kind; instruction cannot be None).
    Returns:
        EvalItems with content-hash ids; extra = {"source", "source_ref" (file:row), "source_id" (if any)}.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ParaBench folder {folder!r} does not exist; download it once with `hf download "
                                f"{PARABENCH_REPO} --repo-type dataset --local-dir {folder}`")
    files = _record_files(folder)
    if not files:
        raise FileNotFoundError(f"ParaBench folder {folder!r} holds no .parquet, .jsonl or .json files; point it at "
                                f"the dataset's root (the folder holding data/)")
    present = set().union(*(_column_names(p) for p in files))
    cols = _resolve_columns(folder, present, columns or {})
    items, refs = [], {}
    for path in files:
        rel = os.path.relpath(path, folder)
        base_dirs = (os.path.dirname(path), folder)
        for row_no, row in enumerate(_read_records(path, list(dict.fromkeys(c for c in cols.values() if c)))):
            item = _parabench_item(row, cols, f"{rel}:{row_no}", base_dirs)
            if item.item_id in refs:
                raise ValueError(f"ParaBench rows {refs[item.item_id]} and {rel}:{row_no} are the same item "
                                 f"({item.item_id}); remove the duplicate")
            refs[item.item_id] = f"{rel}:{row_no}"
            items.append(item)
    return items
