"""Atomic, idempotent, run-partitioned Parquet datasets for the tables in storage/schema.py, on local disk or S3.

Layout under a root (a local directory or `s3://bucket/prefix`):

    {root}/{table}/run={run}/shard-00000.parquet
    {root}/{table}/run={run}/shard-00001.parquet
    {root}/{table}/run={run}/_manifest.json     <- written last; lists the committed shards

A shard counts only once the partition's manifest lists it. `write_rows` writes every new shard (each one atomically:
temp file + rename locally, a single upload on S3), then rewrites the manifest atomically. A crash before the manifest
write leaves unlisted shard files that readers ignore and the next write overwrites, so a resumed stage neither
duplicates nor loses rows. Rows whose key (default `schema.KEYS[table]`) is already committed in the same run partition
are skipped, so re-running a stage is a no-op for the rows it already wrote. One writer per (table, run) partition at a
time. Each write reads the committed key columns of its partition: batch rows (hundreds or more per call).

Holds: validation of rows against the schema (`to_arrow`), `write_rows`, `read_table`, `open_dataset`, manifest access.
Leaves out: SQL (storage/query.py), compaction, deletion of runs, concurrent writers to one partition.
"""
import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage import fs
from storage.schema import CHOICES, KEYS, TABLES, VERSIONS

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 1
SHARD_NAME = "shard-{:05d}.parquet"
ROWS_PER_SHARD = 10_000
COMPRESSION = "zstd"
RUN_COLUMN = "run"  # hive partition column added on read
RUN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RUN_PARTITIONING = ds.partitioning(pa.schema([(RUN_COLUMN, pa.string())]), flavor="hive")

Rows = pa.Table | pa.RecordBatch | Sequence[dict[str, Any]]


class SchemaError(ValueError):
    """Data that does not fit a table's schema, or a dataset written with another schema version."""


@dataclass(frozen=True)
class WriteResult:
    """What one `write_rows` call committed."""

    table: str
    """Table name."""
    run: str
    """Run partition written to."""
    written: int
    """Rows committed by this call."""
    skipped: int
    """Rows dropped because their key was already committed (or repeated within the call)."""
    shards: tuple[str, ...]
    """URIs of the shards this call committed (empty when nothing was new)."""


# ------------------------------------------------------------------------------------------------ names and manifests

def _check_table(table: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(TABLES)} (see storage/schema.py)")


def _check_run(run: str) -> None:
    if not isinstance(run, str) or not RUN_PATTERN.match(run):
        raise ValueError(f"run {run!r} is not a valid partition name; use letters, digits, '.', '_' or '-' "
                         f"(e.g. 'sft-20260101-a1b2')")


def table_uri(root: str, table: str) -> str:
    return fs.join(root, table)


def partition_uri(root: str, table: str, run: str) -> str:
    return fs.join(root, table, f"{RUN_COLUMN}={run}")


def read_manifest(root: str, table: str, run: str, s3: fs.S3Config | None = None) -> dict | None:
    """The committed manifest of one run partition, or None if nothing was ever committed there."""
    uri = fs.join(partition_uri(root, table, run), MANIFEST)
    if not fs.exists(uri, s3):
        return None
    manifest = fs.read_json(uri, s3)
    if manifest.get("schema_version") != VERSIONS[table]:
        raise SchemaError(f"{uri} was written with {table} schema version {manifest.get('schema_version')}, but this "
                          f"code expects version {VERSIONS[table]}; read it with the matching ParaPipe version or "
                          f"rewrite the run")
    return manifest


def _write_manifest(part: str, manifest: dict, s3: fs.S3Config | None) -> None:
    fs.write_json(fs.join(part, MANIFEST), manifest, s3)


def list_runs(root: str, table: str, s3: fs.S3Config | None = None) -> list[str]:
    """Runs of `table` that have a committed manifest, sorted."""
    _check_table(table)
    prefix = f"{RUN_COLUMN}="
    runs = [name[len(prefix):] for name, is_dir in fs.list_dir(table_uri(root, table), s3)
            if is_dir and name.startswith(prefix)]
    return [r for r in runs if fs.exists(fs.join(partition_uri(root, table, r), MANIFEST), s3)]


def committed_files(root: str, table: str, run: str | None = None,
                    s3: fs.S3Config | None = None) -> dict[str, list[str]]:
    """`{run: [shard URI, ...]}` for the committed shards of one run (or all runs), in commit order."""
    _check_table(table)
    runs = [run] if run is not None else list_runs(root, table, s3)
    out = {}
    for r in runs:
        _check_run(r)
        manifest = read_manifest(root, table, r, s3)
        if manifest is not None:
            out[r] = [fs.join(partition_uri(root, table, r), s["file"]) for s in manifest["shards"]]
    return out


# ------------------------------------------------------------------------------------------------ validation

def _column_from_values(table: str, field: pa.Field, values: list) -> pa.Array:
    if pa.types.is_integer(field.type):
        bad = next((v for v in values if isinstance(v, (float, bool))), None)
        if bad is not None:
            raise SchemaError(f"{table}.{field.name}: got {type(bad).__name__} {bad!r} for an {field.type} column; "
                              f"pass whole numbers (int)")
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise SchemaError(f"{table}.{field.name}: cannot store values as {field.type}: {e}; pass {field.type} values "
                          f"(see {table.upper()} in storage/schema.py)") from e


def _column_from_arrow(table: str, field: pa.Field, col: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return col.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise SchemaError(f"{table}.{field.name}: column of type {col.type} does not cast safely to {field.type}: "
                          f"{e}; cast it to {field.type} before writing") from e


def _check_column(table: str, field: pa.Field, col: pa.Array | pa.ChunkedArray) -> None:
    if not field.nullable and col.null_count:
        first = pc.index(pc.is_null(col), True).as_py()
        raise SchemaError(f"{table}.{field.name}: {col.null_count} null value(s) (first at row {first}) in a required "
                          f"column; fill in {field.name} or drop those rows")
    allowed = CHOICES.get((table, field.name))
    if allowed is not None:
        bad = pc.unique(pc.filter(col, pc.invert(pc.is_in(col, pa.array(allowed))))).drop_null().to_pylist()
        if bad:
            raise SchemaError(f"{table}.{field.name}: values {bad} are not allowed; use one of {list(allowed)}")


def _check_rows_type(table: str, rows: object) -> None:
    kind = None if isinstance(rows, pa.Table) else type(rows).__name__
    if isinstance(rows, (list, tuple)):
        kind = next((f"a list holding a {type(r).__name__}" for r in rows if not isinstance(r, dict)), None)
    if kind is not None:
        raise TypeError(f"{table}: rows must be a list of dicts or a pyarrow Table/RecordBatch, got {kind}; "
                        f"convert first, e.g. pa.Table.from_pandas(df)")


def to_arrow(table: str, rows: Rows) -> pa.Table:
    """Validate `rows` (a list of dicts or an Arrow table/batch) against `TABLES[table]` and return a conforming table.

    Missing nullable columns are filled with nulls; unknown columns, unsafe casts, nulls in required columns and values
    outside `schema.CHOICES` raise `SchemaError` naming the column and the fix.
    """
    _check_table(table)
    schema = TABLES[table]
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    _check_rows_type(table, rows)
    names = rows.column_names if isinstance(rows, pa.Table) else sorted({k for r in rows for k in r})
    unknown = [n for n in names if n not in schema.names]
    if unknown:
        hint = f"; '{RUN_COLUMN}' is added by read_table, drop it before writing" if RUN_COLUMN in unknown else ""
        raise SchemaError(f"{table}: unknown column(s) {unknown}; the schema has {schema.names} "
                          f"(drop them or move them into a *_json column){hint}")
    n = rows.num_rows if isinstance(rows, pa.Table) else len(rows)
    arrays = []
    for field in schema:
        if isinstance(rows, pa.Table):
            col = (_column_from_arrow(table, field, rows.column(field.name)) if field.name in names
                   else pa.nulls(n, field.type))
        else:
            col = _column_from_values(table, field, [r.get(field.name) for r in rows])
        _check_column(table, field, col)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)


# ------------------------------------------------------------------------------------------------ writing

def _keys(tbl: pa.Table, key: Sequence[str]) -> Iterable[tuple]:
    return zip(*(tbl.column(k).to_pylist() for k in key))


def _committed_keys(files: list[str], key: Sequence[str], s3: fs.S3Config | None) -> set[tuple]:
    if not files:
        return set()
    filesystem, _ = fs.resolve(files[0], s3)
    paths = [fs.resolve(f, s3)[1] for f in files]
    return set(_keys(ds.dataset(paths, format="parquet", filesystem=filesystem).to_table(columns=list(key)), key))


def _drop_seen(tbl: pa.Table, key: Sequence[str], seen: set[tuple]) -> pa.Table:
    keep = []
    for k in _keys(tbl, key):
        keep.append(k not in seen)
        seen.add(k)
    return tbl.filter(pa.array(keep, pa.bool_())) if not all(keep) else tbl


def _write_shard(uri: str, tbl: pa.Table, s3: fs.S3Config | None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(tbl, sink, compression=COMPRESSION)
    fs.write_bytes(uri, sink.getvalue(), s3)


def write_rows(root: str, table: str, rows: Rows, run: str, key: str | Sequence[str] | None = None,
               rows_per_shard: int = ROWS_PER_SHARD, s3: fs.S3Config | None = None) -> WriteResult:
    """Validate `rows` and commit the ones whose key is new to `{root}/{table}/run={run}/`.

    Args:
        root: local directory or `s3://bucket/prefix`.
        table: a name in `storage.schema.TABLES`.
        rows: list of dicts, or an Arrow table/batch with the schema's columns.
        run: run partition, e.g. the Prefect flow run name.
        key: column(s) identifying a row; defaults to `storage.schema.KEYS[table]`.
        rows_per_shard: rows per Parquet file; one call may write several, committed together.
        s3: explicit S3 settings; default from the AWS_* environment variables.
    Returns:
        WriteResult with the number of rows written and skipped.
    """
    _check_table(table)
    _check_run(run)
    key = (key,) if isinstance(key, str) else tuple(key or KEYS[table])
    missing = [k for k in key if k not in TABLES[table].names]
    if missing:
        raise ValueError(f"key column(s) {missing} are not in table {table!r}; pick from {TABLES[table].names}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard}; use a positive number of rows")
    data = to_arrow(table, rows)
    part = partition_uri(root, table, run)
    manifest = read_manifest(root, table, run, s3)
    fresh = manifest is None
    if fresh:
        manifest = {"format": MANIFEST_FORMAT, "table": table, "run": run, "schema_version": VERSIONS[table],
                    "key": list(key), "rows": 0, "shards": []}
    done = [fs.join(part, s["file"]) for s in manifest["shards"]]
    new = _drop_seen(data, key, _committed_keys(done, key, s3))
    added = []
    for off in range(0, new.num_rows, rows_per_shard):
        chunk = new.slice(off, rows_per_shard)
        name = SHARD_NAME.format(len(manifest["shards"]) + len(added))
        _write_shard(fs.join(part, name), chunk, s3)
        added.append({"file": name, "rows": chunk.num_rows})
    if added or fresh:
        manifest["shards"] = manifest["shards"] + added
        manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
        manifest["updated"] = dt.datetime.now(dt.timezone.utc).isoformat()
        _write_manifest(part, manifest, s3)  # the commit point
    return WriteResult(table=table, run=run, written=new.num_rows, skipped=data.num_rows - new.num_rows,
                       shards=tuple(fs.join(part, s["file"]) for s in added))


# ------------------------------------------------------------------------------------------------ reading

def read_schema(table: str) -> pa.Schema:
    """`TABLES[table]` plus the string `run` partition column that readers add."""
    _check_table(table)
    return TABLES[table].append(pa.field(RUN_COLUMN, pa.string(), nullable=False))


def open_dataset(root: str, table: str, run: str | None = None, s3: fs.S3Config | None = None) -> ds.Dataset:
    """A pyarrow dataset over the committed shards of one run (or all runs); empty if none are committed."""
    files = [f for run_files in committed_files(root, table, run, s3).values() for f in run_files]
    filesystem, base = fs.resolve(table_uri(root, table), s3)
    paths = [fs.resolve(f, s3)[1] for f in files]
    return ds.dataset(paths, schema=read_schema(table), format="parquet", filesystem=filesystem,
                      partitioning=RUN_PARTITIONING, partition_base_dir=base)


def read_table(root: str, table: str, run: str | None = None, filter: pc.Expression | None = None,
               columns: list[str] | None = None, s3: fs.S3Config | None = None) -> pa.Table:
    """Committed rows of `table` (one run or all), with a `run` column; uncommitted shard files are never read.

    `filter` is a pyarrow expression, e.g. `pc.field("split") == "train"`.
    """
    return open_dataset(root, table, run, s3).to_table(filter=filter, columns=columns)
