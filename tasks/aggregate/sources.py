"""Readers of the aggregation flow's four kinds of source, yielding raw records.

Sources: the toy world (embedded default); a local folder with a JSONL manifest; Parquet files
with a column mapping (MagicBrush / UltraEdit / HQ-Edit style); WebDataset tar shards with
`input.jpg / output.jpg / input_text.txt / output_text.txt` members (MMaDA-Parallel's layout).
A reader never raises on a bad record: each record is built inside its own guard, and one that cannot be
read is yielded with `error` set ('reason: detail'), which the flow sends to quarantine. Reads of files go
through tasks/aggregate/source_io.py (confined to the source's root, regular files only, size caps). A record's
`ref` names the file relative to the source's root and the line, row or tar key, so refs are unique
within a source. Only a broken configuration (no manifest, no files, no column mapping) raises.
Decoding, resizing and validation of images and text happen in tasks/aggregate/curate.py.
"""
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tasks.aggregate.source_io import (Rejected, clean, inside, iter_lines, open_regular, read_capped, resolve_in_root,
                                       source_files)

SOURCE_TYPES = ("toy", "jsonl", "parquet", "webdataset")
COLUMN_FIELDS = ("instruction", "input_image", "output_image", "trace", "category")
MAX_FILE_BYTES = 64 << 20
MAX_LINE_BYTES = 1 << 20


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
    origins: dict = field(default_factory=dict)
    """Where each image came from ({'input_image': 'imgs/a.png'}), for messages."""


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
    allow_outside_root: bool = False
    """Read image paths that lead outside the source's root (absolute, ../, symlinks); off by default."""
    max_file_bytes: int = MAX_FILE_BYTES
    """Largest image file or tar member read; bigger ones are quarantined as file_too_large."""
    max_line_bytes: int = MAX_LINE_BYTES
    """jsonl: longest manifest line read; longer ones are quarantined as line_too_long."""

    @property
    def check_near_duplicates(self) -> bool:
        return self.type != "toy" if self.near_duplicates is None else self.near_duplicates

    def __post_init__(self):
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source type {self.type!r} is unknown; use one of {SOURCE_TYPES}")
        if self.type != "toy" and not self.path:
            raise ValueError(f"source {self.name!r} of type {self.type} needs a path")
        if not isinstance(self.allow_outside_root, bool):
            raise ValueError(f"source {self.name!r}: allow_outside_root={self.allow_outside_root!r}; use true or false")
        unknown = sorted(set(dict(self.columns)) - set(COLUMN_FIELDS))
        if unknown:
            raise ValueError(f"source {self.name!r}: columns maps unknown fields {unknown}; map some of "
                             f"{COLUMN_FIELDS} to your column names")
        if self.max_file_bytes < 1 or self.max_line_bytes < 1:
            raise ValueError(f"source {self.name!r}: max_file_bytes={self.max_file_bytes} and "
                             f"max_line_bytes={self.max_line_bytes} must be >= 1")

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


def check_source(spec: SourceSpec) -> None:
    """Raises on a configuration that cannot be read at all (missing manifest, no files, no column mapping)."""
    if spec.type == "toy":
        from tasks.toy.scene import PRESETS

        if spec.preset not in PRESETS:
            raise ValueError(f"toy preset {spec.preset!r} is unknown; use one of {sorted(PRESETS)}")
    elif spec.type == "jsonl":
        manifest = os.path.join(spec.path, spec.manifest)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"source {spec.name!r}: no manifest {manifest!r}; write one JSON object per line "
                                    f"with keys input_image, instruction, output_image (and optional trace, category)")
    else:
        source_files(spec.path, ".parquet" if spec.type == "parquet" else ".tar")
        mapping = dict(spec.columns)
        if spec.type == "parquet" and ("instruction" not in mapping or "output_image" not in mapping):
            raise ValueError(f"parquet source {spec.name!r} needs columns for instruction and output_image, "
                             f"e.g. columns={{'instruction': 'edit_prompt', 'output_image': 'target_img'}}")


def read_source(spec: SourceSpec) -> Iterator[RawRecord]:
    readers = {"toy": _read_toy, "jsonl": _read_jsonl, "parquet": _read_parquet, "webdataset": _read_webdataset}
    check_source(spec)
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


def _guarded(spec: SourceSpec, ref: str, build: Callable[[], RawRecord]) -> RawRecord:
    """The record `build` makes, or an error record for `ref` when it fails: the record boundary."""
    try:
        return build()
    except Rejected as r:
        return _error(spec, ref, r)
    except Exception as e:  # whatever else one record triggers stays with that record
        return _error(spec, ref, Rejected("unreadable_record", f"{ref}: {type(e).__name__}: {e}"))


def _error(spec: SourceSpec, ref: str, r: Rejected) -> RawRecord:
    return RawRecord(spec.name, ref, None, None, None, error=f"{r.reason}: {r.detail}")


# ------------------------------------------------------------------------------------------------ jsonl

def _read_jsonl(spec: SourceSpec) -> Iterator[RawRecord]:
    with open_regular(os.path.join(spec.path, spec.manifest), "manifest") as f:
        for lineno, line in iter_lines(f, spec.max_line_bytes):
            if lineno == 1 and line is not None:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            if line is not None and not line.strip():
                continue
            ref = f"{spec.manifest}:{lineno}"
            yield _guarded(spec, ref, lambda: _jsonl_record(spec, ref, line))


def _jsonl_record(spec: SourceSpec, ref: str, line: bytes | None) -> RawRecord:
    if line is None:
        raise Rejected("line_too_long", f"{ref} is over {spec.max_line_bytes} bytes (max_line_bytes)")
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Rejected("bad_encoding", f"{ref}: byte {e.start} is not UTF-8 ({line[e.start:e.start + 4]!r}); "
                                       f"save the manifest as UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise Rejected("bad_json", f"{ref}: {e}") from None
    if not isinstance(row, dict):
        raise Rejected("bad_json", f"{ref} holds a JSON {type(row).__name__}, expected an object with keys "
                                   f"input_image, instruction, output_image")
    images, origins = {"input_image": None, "output_image": None}, {}
    for key in images:
        if row.get(key) is not None:
            path = resolve_in_root(row[key], spec.path, spec.path, key, spec.allow_outside_root)
            images[key], origins[key] = read_capped(path, key, spec.max_file_bytes), row[key]
    return RawRecord(spec.name, ref, row.get("instruction"), images["input_image"], images["output_image"],
                     trace=row.get("trace"), category=row.get("category"), origins=origins)


# ------------------------------------------------------------------------------------------------ parquet

class _BadCell(str):
    """A cell pyarrow could not convert (e.g. invalid UTF-8 in a string column); the text says why."""


def _read_parquet(spec: SourceSpec) -> Iterator[RawRecord]:
    root, files = source_files(spec.path, ".parquet")
    for rel, path in files:
        yield from _parquet_file(spec, root, rel, path)


def _parquet_file(spec: SourceSpec, root: str, rel: str, path: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    mapping, row_no = dict(spec.columns), 0
    try:
        if not spec.allow_outside_root and not inside(path, root):
            raise Rejected("outside_root", f"{rel} resolves to {os.path.realpath(path)}, outside the source root "
                                           f"{root}; set allow_outside_root: true to read it")
        with open_regular(path, "parquet file") as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in mapping.values() if c not in pf.schema_arrow.names]
            if missing:
                raise Rejected("missing_column", f"{rel} has no columns {missing}; its columns are "
                                                 f"{pf.schema_arrow.names}")
            for batch in pf.iter_batches(batch_size=256, columns=list(dict.fromkeys(mapping.values()))):
                for row in _rows(batch):
                    ref = f"{rel}:{row_no}"
                    yield _guarded(spec, ref, lambda: _parquet_record(spec, root, os.path.dirname(path), ref, row))
                    row_no += 1
    except Rejected as r:
        yield _error(spec, rel, r)
    except Exception as e:  # a corrupt file or page: what was read stays, the rest of the file is one quarantine row
        broken = Rejected("bad_file", f"{rel} cannot be read from row {row_no} on: {type(e).__name__}: {e}")
        yield _error(spec, f"{rel}:{row_no}" if row_no else rel, broken)


def _rows(batch) -> list[dict]:
    try:
        return batch.to_pylist()
    except Exception:  # some cell does not convert: go cell by cell in the failing columns only
        cols = {}
        for name, col in zip(batch.schema.names, batch.columns):
            try:
                cols[name] = col.to_pylist()
            except Exception:
                cols[name] = [_cell(col, i) for i in range(len(col))]
        return [{name: values[i] for name, values in cols.items()} for i in range(batch.num_rows)]


def _cell(col, i: int):
    try:
        return col[i].as_py()
    except Exception as e:
        return _BadCell(f"{type(e).__name__}: {clean(e, 120)}")


def _parquet_record(spec: SourceSpec, root: str, base: str, ref: str, row: dict) -> RawRecord:
    mapping = dict(spec.columns)

    def get(key: str):
        value = row.get(mapping[key]) if key in mapping else None
        if isinstance(value, _BadCell):
            raise Rejected("bad_cell", f"{ref} column {mapping[key]!r}: {value}")
        return value

    images, origins = {"input_image": None, "output_image": None}, {}
    for key in images:
        images[key], origin = _image_cell(spec, get(key), mapping.get(key), root, base, ref)
        if origin:
            origins[key] = origin
    return RawRecord(spec.name, ref, get("instruction"), images["input_image"], images["output_image"],
                     trace=get("trace"), category=get("category"), origins=origins)


def _image_cell(spec: SourceSpec, value, column: str | None, root: str, base: str, ref: str):
    """(bytes or None, origin) of a Parquet image cell: raw bytes, or a Hugging Face Image struct {bytes, path}
    whose relative path is resolved against the Parquet file's folder and confined to the source's root."""
    where = f"{ref} column {column!r}"
    if value is None:
        return None, None
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is None and value.get("path") is not None:
            path = resolve_in_root(value["path"], base, root, f"{where} path", spec.allow_outside_root)
            return read_capped(path, f"{where} path", spec.max_file_bytes), value["path"]
        value = value.get("bytes")
        if value is None:
            return None, None
    if not isinstance(value, bytes):
        raise Rejected("bad_cell", f"{where} holds {type(value).__name__} {clean(repr(value), 60)}; expected "
                                   f"image bytes or a {{bytes, path}} struct")
    if len(value) > spec.max_file_bytes:
        raise Rejected("file_too_large", f"{where} holds {len(value)} bytes, over max_file_bytes="
                                         f"{spec.max_file_bytes}")
    return value, where


# ------------------------------------------------------------------------------------------------ webdataset

def _read_webdataset(spec: SourceSpec) -> Iterator[RawRecord]:
    root, files = source_files(spec.path, ".tar")
    for rel, path in files:
        yield from _tar_records(spec, root, rel, path)


def _tar_records(spec: SourceSpec, root: str, rel: str, path: str) -> Iterator[RawRecord]:
    """One record per group of adjacent members sharing a key (`dir/key.field`), streamed. Uncompressed tars only
    (WebDataset's `.tar`): reading one is bounded by its size on disk, where a gzip bomb would not be."""
    group, seen, index = None, set(), 0
    try:
        if not spec.allow_outside_root and not inside(path, root):
            raise Rejected("outside_root", f"{rel} resolves to {os.path.realpath(path)}, outside the source root "
                                           f"{root}; set allow_outside_root: true to read it")
        with open_regular(path, "tar shard") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for index, member in enumerate(tar):
                if member.isdir():
                    continue
                stem, _, field_name = os.path.basename(member.name).partition(".")
                key = os.path.join(os.path.dirname(member.name), stem)
                if group is None or group["key"] != key:
                    if group is not None:
                        yield _tar_record(spec, group)
                    group = _new_group(rel, key, index, seen)
                _add_member(tar, member, field_name, group, spec.max_file_bytes)
            if group is not None and not _ended(tar):
                group["errors"].insert(0, Rejected("bad_tar", f"{rel} stops after member {index} without an "
                                                              f"end-of-archive marker (cut, or a corrupt header); "
                                                              f"the last sample may be incomplete"))
    except Rejected as r:
        yield _error(spec, rel, r)
        return
    except Exception as e:  # a corrupt or cut tar: the group being read may be incomplete
        broken = Rejected("bad_tar", f"{rel} breaks at member {index}: {type(e).__name__}: {e}; the sample being "
                                     f"read may be incomplete and later members are lost")
        if group is None:
            not_tar = f"{rel} is not a readable uncompressed tar ({type(e).__name__}: {e}); decompress it first"
            yield _error(spec, rel, Rejected("bad_tar", not_tar))
            return
        group["errors"].insert(0, broken)
    if group is not None:
        yield _tar_record(spec, group)


def _ended(tar: tarfile.TarFile) -> bool:
    """Whether the archive stops at its end-of-archive zero block (tarfile stops quietly at a cut or bad header)."""
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


def _new_group(rel: str, key: str, index: int, seen: set) -> dict:
    group = {"ref": clean(f"{rel}:{key}", 10_000), "key": key, "members": {}, "errors": []}
    if key in seen:  # keys must be unique: a second group gets its own ref, and a quarantine row
        group["ref"] += f"#{index}"
        group["errors"].append(Rejected("duplicate_key", f"key {key!r} of {rel} appears again at member {index}; "
                                                         f"the members of one sample must be adjacent"))
    seen.add(key)
    return group


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, field_name: str, group: dict, limit: int) -> None:
    if not member.isfile():
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special member"
        group["errors"].append(Rejected("bad_member", f"{member.name} is a {kind}; only regular members are read"))
    elif member.size > limit:
        group["errors"].append(Rejected("file_too_large", f"{member.name} is {member.size} bytes, over "
                                                          f"max_file_bytes={limit}"))
    elif field_name in group["members"]:
        group["errors"].append(Rejected("duplicate_member", f"{member.name} appears twice"))
    else:
        group["members"][field_name] = tar.extractfile(member).read(limit + 1)


def _tar_record(spec: SourceSpec, group: dict) -> RawRecord:
    return _guarded(spec, group["ref"], lambda: _group_record(spec, group))


def _group_record(spec: SourceSpec, group: dict) -> RawRecord:
    if group["errors"]:
        raise group["errors"][0]
    members, images, origins = group["members"], {}, {}
    for stem in ("input", "output"):
        names = sorted(f for f in members if f.startswith(f"{stem}."))
        if len(names) > 1:
            raise Rejected("ambiguous_member", f"{group['ref']} has {len(names)} {stem} images {names}; keep one")
        images[stem] = members[names[0]] if names else None
        if names:
            origins[f"{stem}_image"] = f"{group['ref']}.{names[0]}"
    return RawRecord(spec.name, group["ref"], members.get("input_text.txt"), images["input"], images["output"],
                     trace=members.get("output_text.txt"), origins=origins)
