"""The `runs` table: one row per stage invocation - what ran, with which config and code, and for how long.

Key (run_id, stage, start_time): a resumed or extended run adds a row for the part it did, so the
table reads as the run's history. A stage that raises still gets its row, with `"error"` in
timings_json, then the error goes on. Every row is its own partition (RUN_ID.STAGE.START), so two
invocations at once (two aggregations of one dataset, one of them refused) never write one
partition together. Read it with `parapipe query "SELECT * FROM runs"`.
"""
import contextlib
import datetime as dt
import json
import time


def record(root: str, row: dict) -> None:
    """Commits one runs row to a partition of its own."""
    from storage.parquet import write_rows

    write_rows(root, "runs", [row], run=f"{row['run_id']}.{row['stage']}.{row['start_time']:%Y%m%dT%H%M%S%f}")


def stage_row(run_id: str, stage: str, config: dict, start: dt.datetime, timings: dict) -> dict:
    """A runs-table row ending now; `config` and `timings` are JSON-serialisable dicts."""
    from tasks.pipeline.stage_cache import code_version

    return {"run_id": run_id, "stage": stage, "config_json": json.dumps(config, default=str),
            "code_version": code_version(), "start_time": start, "end_time": dt.datetime.now(dt.timezone.utc),
            "timings_json": json.dumps(timings, default=str)}


@contextlib.contextmanager
def recorded(root: str, run_id: str, stage: str, config: dict):
    """Times the block and writes its runs row on the way out; the yielded dict collects timings.

    `seconds` (the block's wall time) is added; on an exception `error` too, and the exception goes on
    even when the row itself cannot be written (the storage being the thing that failed).
    """
    start, t0, timings = dt.datetime.now(dt.timezone.utc), time.perf_counter(), {}
    try:
        yield timings
    except BaseException as e:
        timings["error"] = f"{type(e).__name__}: {e}"[:500]
        try:
            record(root, stage_row(run_id, stage, config, start, _done(timings, t0)))
        except Exception as w:  # noqa: BLE001 - the stage's own error is the one to raise
            print(f"WARNING: could not record the failed {stage} run {run_id!r} in the runs table: {w}")
        raise
    record(root, stage_row(run_id, stage, config, start, _done(timings, t0)))


def _done(timings: dict, t0: float) -> dict:
    return {**timings, "seconds": round(time.perf_counter() - t0, 3)}
