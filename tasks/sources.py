"""Readers of the aggregation flow's four kinds of source, yielding raw records.

Sources: the toy world (embedded default); a local folder with a JSONL manifest; Parquet files
with a column mapping (MagicBrush / UltraEdit / HQ-Edit style); WebDataset tar shards with
`input.jpg / output.jpg / input_text.txt / output_text.txt` members (MMaDA-Parallel's layout).
A reader never raises on a bad record: it yields the record with `error` set, and the flow sends
it to quarantine. Decoding, resizing and validation of images happen in tasks/curate.py.
"""
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

SOURCE_TYPES = ("toy", "jsonl", "parquet", "webdataset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class RawRecord:
    """One sample as a source gave it (images are encoded file bytes)."""

    source: str
    ref: str
    """Where it came from inside the source (line number, file and row, tar member key)."""
    instruction: str | None
    input_image: bytes | None
    output_image: bytes | None
    trace: str | None = None
    category: str | None = None
    split: str | None = None
    error: str | None = None
    """Set when the record could not be read: 'reason: detail'."""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SourceSpec:
    """One source of the aggregation flow (flow parameters arrive as plain dicts: see from_dict)."""

    type: str
    """toy, jsonl, parquet or webdataset."""
    name: str
    """Name recorded in the samples table's `source` column."""
    path: str = ""
    """jsonl: folder holding the manifest; parquet / webdataset: file, folder or glob."""
    manifest: str = "manifest.jsonl"
    """jsonl: manifest file name inside `path`."""
    columns: tuple[tuple[str, str], ...] = ()
    """parquet: (our field, their column) pairs for instruction, input_image, output_image, trace, category."""
    preset: str = "tiny"
    """toy: preset name."""
    n: int = 0
    """toy: samples per split, in the proportions of `splits`; other types: read at most n (0 = all)."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """toy: splits to draw."""
    seed: int = 0
    """toy: sampling seed."""
    trace_error_rate: float = 0.0
    """toy: fraction of teacher traces with an injected error."""
    categories: tuple[str, ...] = ()
    """toy: draw only these categories (default: all)."""
    compact_traces: bool = True
    """toy: short traces (facts + result, ~15 words) that a tiny model can learn; False adds the changes."""
    near_duplicates: bool | None = None
    """Check perceptual near-duplicates; default on, except for the toy world (exact ground truth,
    where two distinct small scenes can share most hash bits)."""

    @property
    def check_near_duplicates(self) -> bool:
        return self.type != "toy" if self.near_duplicates is None else self.near_duplicates

    def __post_init__(self):
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source type {self.type!r} is unknown; use one of {SOURCE_TYPES}")
        if self.type != "toy" and not self.path:
            raise ValueError(f"source {self.name!r} of type {self.type} needs a path")

    @classmethod
    def from_dict(cls, d: dict) -> "SourceSpec":
        d = dict(d)
        d.setdefault("name", d.get("type", "?"))
        if "columns" in d and isinstance(d["columns"], dict):
            d["columns"] = tuple(d["columns"].items())
        for key in ("splits", "categories"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"source {d['name']!r} has unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def read_source(spec: SourceSpec) -> Iterator[RawRecord]:
    readers = {"toy": _read_toy, "jsonl": _read_jsonl, "parquet": _read_parquet, "webdataset": _read_webdataset}
    limit = spec.n if spec.type != "toy" else 0
    for i, rec in enumerate(readers[spec.type](spec)):
        if limit and i >= limit:
            return
        yield rec


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _read_toy(spec: SourceSpec) -> Iterator[RawRecord]:
    from tasks.toy.render import render
    from tasks.toy.scene import PRESETS
    from tasks.toy.tasks import SPLIT_FRACTIONS, sample_tasks
    from tasks.toy.teacher import write_trace

    if spec.preset not in PRESETS:
        raise ValueError(f"toy preset {spec.preset!r} is unknown; use one of {sorted(PRESETS)}")
    preset = PRESETS[spec.preset]
    for split in spec.splits:
        n = max(1, round(spec.n * SPLIT_FRACTIONS[split])) if spec.n else 0
        for task in sample_tasks(preset, n, split, spec.seed, spec.categories or None):
            trace = write_trace(task, preset, seed=spec.seed, error_rate=spec.trace_error_rate,
                                compact=spec.compact_traces)
            yield RawRecord(
                source=spec.name, ref=task.sample_id, instruction=task.instruction,
                input_image=None if task.input_scene is None else _png(render(task.input_scene, preset)),
                output_image=_png(render(task.output_scene, preset)), trace=trace.text, category=task.category,
                split=split, extra={"toy": task.to_dict(), "trace_error": trace.error_injected})


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, f"missing_file: {path}: {e.strerror}"


def _read_jsonl(spec: SourceSpec) -> Iterator[RawRecord]:
    manifest = os.path.join(spec.path, spec.manifest)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"no manifest {manifest!r}; write one JSON object per line with keys "
                                f"input_image, instruction, output_image (and optional trace, category)")
    with open(manifest) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ref = f"{spec.manifest}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRecord(spec.name, ref, None, None, None, error=f"bad_json: {e}")
                continue
            images, errors = {}, []
            for key in ("input_image", "output_image"):
                images[key] = None
                if row.get(key):
                    images[key], err = _read_file(os.path.join(spec.path, row[key]))
                    errors += [err] if err else []
            yield RawRecord(spec.name, ref, row.get("instruction"), images["input_image"], images["output_image"],
                            trace=row.get("trace"), category=row.get("category"),
                            error=errors[0] if errors else None)


def _expand(path: str, suffix: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, f"**/*{suffix}"), recursive=True))
    files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"no {suffix} files match {path!r}")
    return files


def _image_cell(value) -> bytes | None:
    """Parquet image cell: raw bytes, or a Hugging Face Image struct {bytes, path}."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return _read_file(value["path"])[0]
    return None


def _read_parquet(spec: SourceSpec) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    mapping = dict(spec.columns)
    if "instruction" not in mapping or "output_image" not in mapping:
        raise ValueError(f"parquet source {spec.name!r} needs columns for instruction and output_image, "
                         f"e.g. columns={{'instruction': 'edit_prompt', 'output_image': 'target_img'}}")
    for path in _expand(spec.path, ".parquet"):
        pf = pq.ParquetFile(path)
        missing = [c for c in mapping.values() if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{path} has no columns {missing}; its columns are {pf.schema_arrow.names}")
        row_no = 0
        for batch in pf.iter_batches(batch_size=256, columns=list(mapping.values())):
            for row in batch.to_pylist():
                get = lambda k: row.get(mapping[k]) if k in mapping else None  # noqa: E731
                yield RawRecord(spec.name, f"{os.path.basename(path)}:{row_no}", get("instruction"),
                                _image_cell(get("input_image")), _image_cell(get("output_image")),
                                trace=get("trace"), category=get("category"))
                row_no += 1


def _read_webdataset(spec: SourceSpec) -> Iterator[RawRecord]:
    for path in _expand(spec.path, ".tar"):
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, field_name = os.path.basename(member.name).partition(".")
                    groups.setdefault(os.path.join(os.path.dirname(member.name), key), {})[field_name] = \
                        tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            yield RawRecord(spec.name, os.path.basename(path), None, None, None, error=f"bad_tar: {e}")
        for key, members in groups.items():
            text = lambda k: members[k].decode("utf-8", "replace").strip() if k in members else None  # noqa: E731
            image = lambda stem: next((members[f"{stem}{s}"] for s in IMAGE_SUFFIXES if f"{stem}{s}" in members),  # noqa: E731
                                      None)
            yield RawRecord(spec.name, f"{os.path.basename(path)}:{key}", text("input_text.txt"), image("input"),
                            image("output"), trace=text("output_text.txt"))
