"""Aggregation throughput and DuckDB query latency.

    python benchmarks/aggregate.py [--samples 2000] [--trajectory-rows 1000000]

1. Samples/s through the Prefect flow (ephemeral server) vs the bare per-record work
   (read -> normalise -> dedupe, no Prefect, no Parquet) on the same toy source, and their ratio.
2. DuckDB latency of the canned `trajectories_by_step` view and a filtered lookup over a
   trajectories table of N rows written through storage.parquet, next to pyarrow's own group-by.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def bench_flow(n: int) -> None:
    from flows.aggregate import aggregate
    from tasks.aggregate.curate import CurateConfig, Deduper, normalise
    from tasks.aggregate.sources import SourceSpec, read_source

    spec = {"type": "toy", "name": "toy", "preset": "tiny", "n": n, "seed": 0}
    records = list(read_source(SourceSpec.from_dict(spec)))
    t0 = time.perf_counter()
    records = list(read_source(SourceSpec.from_dict(spec)))
    dedupe, cfg = Deduper(), CurateConfig()
    for rec in records:
        dedupe.check_add(normalise(rec, cfg), near=False)
    bare = len(records) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as root:
        aggregate(sources=[spec], root=root, dataset="warmup-server", near_duplicate_bits=-1)  # server start-up
        t0 = time.perf_counter()
        summary = aggregate(sources=[spec], root=root, dataset="bench")
        flow = summary["samples"] / (time.perf_counter() - t0)
    print(f"aggregate: {len(records)} toy samples | bare loop {bare:8.0f} samples/s | flow {flow:8.0f} samples/s "
          f"| flow / bare = {flow / bare:.2f}")


def _trajectories(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    steps = 32
    return pa.table({
        "run_id": pa.array(np.where(rng.random(n) < 0.5, "rl-a", "rl-b")),
        "round": pa.array(rng.integers(0, 10, n).astype(np.int32)),
        "sample_id": pa.array([f"s{i // steps:07d}" for i in range(n)]),
        "group_index": pa.array(rng.integers(0, 8, n).astype(np.int32)),
        "step": pa.array((np.arange(n) % steps).astype(np.int32)),
        "text_tokens": pa.array([None] * n, pa.list_(pa.int32())),
        "text": pa.array([None] * n, pa.string()),
        "image_codes": pa.array([None] * n, pa.list_(pa.int32())),
        "text_mask_frac": pa.array(rng.random(n).astype(np.float32)),
        "image_mask_frac": pa.array(rng.random(n).astype(np.float32)),
    })


def _best(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_duckdb(n: int) -> None:
    from storage.parquet import read_table, write_rows
    from storage.query import connect

    with tempfile.TemporaryDirectory() as root:
        tbl = _trajectories(n)
        t0 = time.perf_counter()
        write_rows(root, "trajectories", tbl, run="bench", rows_per_shard=250_000)
        write_s = time.perf_counter() - t0
        con = connect(root)
        by_step = _best(lambda: con.sql("SELECT * FROM trajectories_by_step").fetch_arrow_table())
        lookup = _best(lambda: con.sql("SELECT count(*), avg(text_mask_frac) FROM trajectories "
                                       "WHERE sample_id = 's0012345' AND run_id = 'rl-a'").fetchall())
        data = read_table(root, "trajectories", columns=["run_id", "round", "step", "text_mask_frac"])
        arrow = _best(lambda: data.group_by(["run_id", "round", "step"]).aggregate([("text_mask_frac", "mean")]))
        scan = _best(lambda: pc.sum(read_table(root, "trajectories", columns=["step"]).column("step")))
    print(f"duckdb over {n} trajectory rows (write {write_s:.2f} s): trajectories_by_step {by_step * 1e3:.1f} ms | "
          f"point lookup {lookup * 1e3:.1f} ms | pyarrow group-by on loaded table {arrow * 1e3:.1f} ms | "
          f"pyarrow read+sum {scan * 1e3:.1f} ms | duckdb / (read+group-by) = {by_step / (arrow + scan):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--trajectory-rows", type=int, default=1_000_000)
    a = ap.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="parapipe-bench-"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    bench_flow(a.samples)
    bench_duckdb(a.trajectory_rows)


if __name__ == "__main__":
    main()
