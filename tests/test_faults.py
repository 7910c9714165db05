"""Fault injection across the stages: SIGKILL at several points (before, during, right after a commit), re-run,
and compare every table with an uninterrupted run (0 rows lost, 0 duplicated, checkpoints loadable); a second
Ray node killed mid-SFT and mid-RL; the S3 server stopped and restarted mid-write; two writers on one dataset.

Helpers (start in a process group, kill when the Nth commit appears, snapshot tables) are in tests/faults.py.
"""
import json
import random

import pytest

import tasks.aggregate as agg
from storage.parquet import read_table
from tests.faults import (after, commits, commits_at_least, compare, finish, kill_when, snapshot, start, then,
                          uncommitted_shard)

CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)
TOY = {"type": "toy", "name": "toy", "preset": "tiny", "n": 240, "seed": 4}
AGG_CHUNK = 40  # 240 samples -> 6 commits of the samples table
AGG_CODE = ("import json, sys; import tasks.aggregate as agg; agg.CHUNK_ROWS = int(sys.argv[4]); "
            "print(agg.ingest_source.fn(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[5])))")


def _agg_args(spec: dict, root: str, dataset: str = "d") -> list[str]:
    return [json.dumps(spec), root, dataset, str(AGG_CHUNK), json.dumps(CURATE)]


@pytest.fixture(scope="module")
def agg_reference(tmp_path_factory):
    """The lake an uninterrupted aggregation of TOY writes (in this process)."""
    root = str(tmp_path_factory.mktemp("agg-ref") / "lake")
    agg.ingest_source.fn(TOY, root, "d", CURATE)
    return snapshot(root)


def test_aggregate_killed_before_during_and_after_commits_resumes_exactly(agg_reference, tmp_path):
    root, log = str(tmp_path / "lake"), tmp_path / "agg.log"
    rng = random.Random(0)
    kills = [after(0.5),                                  # before: still importing, nothing committed
             commits_at_least(root, "samples", 1),       # right after the first commit
             uncommitted_shard(root, "samples"),         # during a commit: shard written, manifest not yet
             then(commits_at_least(root, "samples", 3), rng.uniform(0.0, 1.0))]  # somewhere after the third
    landed, seen = 0, []
    for i, cond in enumerate(kills):
        proc = start(_agg_args(TOY, root), log, f"agg-{tmp_path.name}-{i}", code=AGG_CODE)
        if kill_when(proc, cond, f"agg-{tmp_path.name}-{i}", timeout=300, poll=0.002):
            landed += 1
        seen.append(commits(root, "samples"))
    proc = start(_agg_args(TOY, root), log, f"agg-{tmp_path.name}-end", code=AGG_CODE)
    finish(proc, f"agg-{tmp_path.name}-end", log, timeout=300)
    assert landed >= 3 and seen[0] == 0 and seen[1] >= 1, (landed, seen)
    rows = compare(snapshot(root), agg_reference)
    assert rows == read_table(root, "samples").num_rows + read_table(root, "quarantine").num_rows
    print(f"faults: aggregate, {len(kills)} kills tried, {landed} landed (commits seen {seen}), {rows} rows compared")
