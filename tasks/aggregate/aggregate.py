"""Prefect tasks of the aggregation flow: ingest one source into the samples table, summarise.

`ingest_source` streams a source in chunks: normalise + validate (tasks/aggregate/curate.py), deduplicate
against everything already committed to the dataset (any source), then commit the chunk's samples
and quarantine rows. Every chunk is committed before the next is read, and writes skip keys that
are already committed, so a crashed or retried ingest resumes without duplicates or loss.
A bad record never fails its source: whatever goes wrong with one record becomes its quarantine row
(readers guard each record; normalise is guarded here). What still raises is the storage or the
configuration; only failures that may pass (OSError other than a missing or forbidden path) are retried.
Re-running re-reads quarantined records and quarantines them again, which the quarantine table's key
(source, source_ref, reason) turns into a no-op.
One ingest per (root, dataset) at a time (`dataset_lock`): a second writer would reuse the first's shard
names and manifest and lose rows; it fails at once with `DatasetBusy` instead.
"""
import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from prefect import task
from prefect.artifacts import create_table_artifact, update_progress_artifact

from storage.fs import is_s3
from storage.parquet import read_table, write_rows
from tasks.aggregate.curate import CurateConfig, Deduper, Rejected, normalise, quarantine_row
from tasks.aggregate.source_io import clean
from tasks.aggregate.sources import SourceSpec, read_source

CHUNK_ROWS = 512
INDEX_COLUMNS = ["sample_id", "source", "instruction", "content_hash", "phash", "extra_json"]


@dataclass
class SourceStats:
    source: str
    read: int = 0
    accepted: int = 0
    already_present: int = 0
    quarantined: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def row(self) -> dict:
        return {"source": self.source, "read": self.read, "accepted": self.accepted,
                "already_present": self.already_present, "quarantined": sum(self.quarantined.values()),
                "reasons": ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "-",
                "samples_per_s": round(self.read / self.seconds, 1) if self.seconds else 0.0}


class DatasetBusy(RuntimeError):
    """Another process is aggregating into the same dataset (not retried: it holds the lock until it ends)."""


@contextlib.contextmanager
def dataset_lock(root: str, dataset: str):
    """An exclusive flock on `{root}/_locks/aggregate-{dataset}.lock` for one ingest; the kernel drops it when the
    process ends, SIGKILL included, so a crash never leaves a stale lock. For an s3:// root the lock file lives
    in ~/.cache/parapipe/locks (named by a hash of root and dataset): it guards against writers on this machine only.
    """
    import fcntl

    if is_s3(root):
        folder = os.path.join(os.path.expanduser("~"), ".cache", "parapipe", "locks")
        name = hashlib.sha256(f"{root}\0{dataset}".encode()).hexdigest()[:24] + ".lock"
    else:
        folder, name = os.path.join(root, "_locks"), f"aggregate-{dataset}.lock"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise DatasetBusy(f"dataset {dataset!r} under {root} is being written by another aggregation "
                              f"({f.read().strip() or 'unknown process'}; lock {path}); wait for it to end, or "
                              f"aggregate into another dataset") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


def _committed_index(root: str, dataset: str, near_bits: int) -> tuple[Deduper, set[tuple[str, str]]]:
    """A deduper over the committed samples, and the (source, ref) pairs already ingested."""
    dedupe, refs = Deduper(near_bits), set()
    for r in read_table(root, "samples", run=dataset, columns=INDEX_COLUMNS).to_pylist():
        dedupe.check_add(r)
        refs.add((r["source"], json.loads(r["extra_json"] or "{}").get("source_ref")))
    return dedupe, refs


def _commit(root: str, dataset: str, rows: list[dict], rejects: list[dict]) -> None:
    if rows:
        write_rows(root, "samples", rows, run=dataset)
    if rejects:
        write_rows(root, "quarantine", rejects, run=dataset)


def _ingest_chunk(records, cfg: CurateConfig, dedupe: Deduper, refs: set, stats: SourceStats, near: bool):
    """Returns (new sample rows, quarantine rows) of one chunk; updates dedupe, refs and stats."""
    rows, rejects = [], []
    for rec in records:
        stats.read += 1
        if (rec.source, rec.ref) in refs:
            stats.already_present += 1
            continue
        try:
            row = normalise(rec, cfg)
        except Rejected as r:
            rejects.append(quarantine_row(rec, r.reason, r.detail))
            stats.quarantined[r.reason] += 1
            continue
        except Exception as e:  # the record boundary: an unforeseen failure stays with its record
            rejects.append(quarantine_row(rec, "unexpected_error", f"{rec.ref}: {type(e).__name__}: {clean(e)}"))
            stats.quarantined["unexpected_error"] += 1
            continue
        hit = dedupe.check_add(row, near)
        if hit is not None:
            rejects.append(quarantine_row(rec, hit[0], f"same as sample {hit[1]}"))
            stats.quarantined[hit[0]] += 1
            continue
        rows.append(row)
        refs.add((rec.source, rec.ref))
    stats.accepted += len(rows)
    return rows, rejects


def may_pass(task, task_run, state) -> bool:
    """Retry condition: only an OSError that is not a missing, forbidden or wrong-kind path may pass on retry."""
    exc = state.data if isinstance(state.data, BaseException) else None
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return exc is None or (isinstance(exc, OSError) and not isinstance(exc, permanent))


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=may_pass, task_run_name="ingest-{spec[name]}")
def ingest_source(spec: dict, root: str, dataset: str, curate: dict, progress_id=None,
                  progress_span: tuple[float, float] = (0.0, 100.0)) -> dict:
    """Reads one source into `{root}/samples/run={dataset}` and `{root}/quarantine/run={dataset}`.

    Returns its counts: {source, read, accepted, already_present, quarantined, reasons, samples_per_s}, where
    read = accepted + already_present + quarantined.
    """
    source = SourceSpec.from_dict(spec)
    cfg = CurateConfig(**curate)
    with dataset_lock(root, dataset):
        return _ingest(source, root, dataset, cfg, progress_id, progress_span)


def _ingest(source: SourceSpec, root: str, dataset: str, cfg: CurateConfig, progress_id,
            progress_span: tuple[float, float]) -> dict:
    dedupe, refs = _committed_index(root, dataset, cfg.near_duplicate_bits)
    stats, chunk, t0 = SourceStats(source.name), [], time.perf_counter()
    expected, committed = source.n or None, 0  # records read and committed (stats.read runs ahead by a chunk)
    try:
        for rec in read_source(source):
            chunk.append(rec)
            if len(chunk) == CHUNK_ROWS:
                _commit(root, dataset, *_ingest_chunk(chunk, cfg, dedupe, refs, stats, source.check_near_duplicates))
                chunk, committed = [], stats.read
                _report(progress_id, progress_span, stats, expected)
        _commit(root, dataset, *_ingest_chunk(chunk, cfg, dedupe, refs, stats, source.check_near_duplicates))
    except Exception as e:
        last = chunk[-1].ref if chunk else "the start"
        e.add_note(f"while ingesting source {source.name!r} ({source.type} {source.path or source.preset}): "
                   f"{committed} records committed, failed after record {last}")
        raise
    stats.seconds = time.perf_counter() - t0
    _report(progress_id, progress_span, stats, stats.read)
    return stats.row()


def _report(progress_id, span: tuple[float, float], stats: SourceStats, expected: int | None) -> None:
    if progress_id is None:
        return
    frac = min(1.0, stats.read / expected) if expected else 0.5
    update_progress_artifact(progress_id, span[0] + (span[1] - span[0]) * frac,
                             description=f"{stats.source}: {stats.read} read, {stats.accepted} accepted")


@task
def summarise(root: str, dataset: str, per_source: list[dict]) -> dict:
    """Totals of the committed dataset plus the per-source table, published as a table artifact."""
    samples = read_table(root, "samples", run=dataset, columns=["split", "category"])
    quarantine = read_table(root, "quarantine", run=dataset, columns=["reason"])
    summary = {"dataset": dataset, "samples": samples.num_rows, "quarantined": quarantine.num_rows,
               "by_split": dict(Counter(samples.column("split").to_pylist())),
               "by_category": dict(Counter(samples.column("category").to_pylist())),
               "quarantine_reasons": dict(Counter(quarantine.column("reason").to_pylist())),
               "sources": per_source}
    create_table_artifact(per_source + [{"source": "TOTAL (dataset)", "read": "", "accepted": samples.num_rows,
                                         "already_present": "", "quarantined": quarantine.num_rows,
                                         "reasons": json.dumps(summary["quarantine_reasons"]), "samples_per_s": "",
                                         "status": ""}],
                          key=f"aggregate-{_artifact_key(dataset)}", description=f"aggregation of {dataset}")
    return summary


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
