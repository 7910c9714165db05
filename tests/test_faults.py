"""Fault injection across the stages: SIGKILL at several points (before, during, right after a commit), re-run,
and compare every table with an uninterrupted run (0 rows lost, 0 duplicated, checkpoints loadable); a second
Ray node killed mid-SFT and mid-RL; the S3 server stopped and restarted mid-write; two writers on one dataset.

Helpers (start in a process group, kill when the Nth commit appears, snapshot tables) are in tests/faults.py.
"""
import glob
import json
import os
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


def test_two_aggregations_into_one_dataset_lose_nothing_or_fail_clearly(tmp_path):
    """Two writers on one partition would reuse shard names and drop each other's manifest entries (40 of 480
    rows were lost before the dataset lock); now the second fails at once naming the holder, and a re-run adds it."""
    root, log = str(tmp_path / "lake"), tmp_path / "agg.log"
    specs = [TOY, {**TOY, "name": "toy2", "seed": 9}]
    want = tmp_path / "want"
    for spec in specs:
        agg.ingest_source.fn(spec, str(want), "d", CURATE)
    with agg.dataset_lock(root, "d"):  # a holder that never ends on its own: refused, not waited for
        proc = start(_agg_args(specs[0], root), log, f"busy-{tmp_path.name}", code=AGG_CODE)
        with pytest.raises(AssertionError, match=r"DatasetBusy: dataset 'd' under .* is being written by another "
                                                 rf"aggregation \(pid {os.getpid()}"):
            finish(proc, f"busy-{tmp_path.name}", log, timeout=300)
    procs = [start(_agg_args(s, root), log, f"two-{tmp_path.name}-{i}", code=AGG_CODE) for i, s in enumerate(specs)]
    codes = [p.wait(timeout=300) for p in procs]
    assert set(codes) <= {0, 1}, codes
    busy = log.read_text().count("DatasetBusy: dataset 'd'")
    assert busy == 1 + codes.count(1), (codes, busy)  # every failure is the clear one
    for spec, code in zip(specs, codes):
        if code:
            finish(start(_agg_args(spec, root), log, f"again-{tmp_path.name}", code=AGG_CODE),
                   f"again-{tmp_path.name}", log, timeout=300)
    rows = compare(snapshot(root), snapshot(str(want)))
    assert rows == 480
    print(f"faults: two aggregations at once, exit codes {codes}, {rows} rows compared")


PIPELINE_YAML = ("reward_steps: 10\neval_limit: 12\nrl: {rounds: 2, prompts_per_round: 4, group_size: 2, "
                 "norm_min_prompts: 8, checkpoint_every: 1}\n")


def _pipeline(tmp_path, out: str, mark: str):
    (tmp_path / "run.yaml").write_text(PIPELINE_YAML)
    argv = ["run", "--out", out, "--toy-samples", "200", "--sft-steps", "4", "--config", str(tmp_path / "run.yaml")]
    return start(argv, tmp_path / f"{out}.log", mark, cwd=tmp_path, env={"PREFECT_HOME": str(tmp_path / "prefect")})


def _scores(log) -> list[str]:
    """The closing table of the last run in a log (checkpoint, decoding, TQ ... overall)."""
    text = log.read_text(errors="replace").rsplit("ParaPipe run finished", 1)[-1]
    return [ln for ln in text.splitlines() if ln.startswith(("  SFT (", "  ParaRL ("))]


@pytest.mark.slow
def test_the_pipeline_killed_in_every_stage_ends_as_an_uninterrupted_run(tmp_path):
    from model.checkpoint import from_pretrained

    ref = _pipeline(tmp_path, "ref", f"pipe-ref-{tmp_path.name}")
    finish(ref, f"pipe-ref-{tmp_path.name}", tmp_path / "ref.log", timeout=1500)
    data = str(tmp_path / "killed" / "data")
    kills = {"before any stage": after(3.0),
             "after the samples commit (aggregate)": commits_at_least(data, "samples", 1),
             "after a traces commit": commits_at_least(data, "traces", 1),
             "mid-SFT, after a metrics commit": commits_at_least(data, "train_metrics", 1),
             "after ParaRL round 0's commit": commits_at_least(data, "rl_metrics", 1),
             "mid-evaluation, after an outputs commit": commits_at_least(data, "eval_outputs", 1)}
    landed = []
    for i, (where, cond) in enumerate(kills.items()):
        mark = f"pipe-{i}-{tmp_path.name}"
        if kill_when(_pipeline(tmp_path, "killed", mark), cond, mark, timeout=900, poll=0.01):
            landed.append(where)
    log = tmp_path / "killed.log"
    finish(_pipeline(tmp_path, "killed", f"pipe-end-{tmp_path.name}"), f"pipe-end-{tmp_path.name}", log, timeout=900)
    assert landed == list(kills), f"kills that never landed: {set(kills) - set(landed)}"
    got = snapshot(data, out=str(tmp_path / "killed"))
    want = snapshot(str(tmp_path / "ref" / "data"), out=str(tmp_path / "ref"))
    assert all(want[t] for t in ("samples", "traces", "train_metrics", "rl_metrics", "trajectories", "eval_outputs"))
    rows = compare(got, want)
    assert _scores(log) == _scores(tmp_path / "ref.log") and len(_scores(log)) == 4
    for ckpt in glob.glob(str(tmp_path / "killed" / "**" / "final"), recursive=True) + \
            sorted(glob.glob(str(tmp_path / "killed" / "rl" / "checkpoints" / "*" / "round-*"))):
        assert from_pretrained(ckpt)[0] is not None, ckpt
    print(f"faults: pipeline, {len(kills)} kills landed in {len(landed)} places, {rows} rows in "
          f"{sum(bool(c) for c in want.values())} tables compared, scores {_scores(log)}")
