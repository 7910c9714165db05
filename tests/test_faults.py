"""Fault injection across the stages: SIGKILL at several points (before, during, right after a commit), re-run,
and compare every table with an uninterrupted run (0 rows lost, 0 duplicated, checkpoints loadable); a second
Ray node killed mid-SFT and mid-RL; the S3 server stopped and restarted mid-write; two writers on one dataset.

Helpers (start in a process group, kill when the Nth commit appears, snapshot tables) are in tests/faults.py.
"""
import glob
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import tasks.aggregate.aggregate as agg
from storage.parquet import read_table
from tests.faults import (after, commits, commits_at_least, compare, exists, finish, kill_when, snapshot, start,
                          then, uncommitted_shard)
from tests.test_pararl import _metrics, _run  # fixtures sft_checkpoint, random_clip: conftest.py
from tests.test_sft_ray import _fit, _losses, prepared  # noqa: F401  (fixture)

CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)
TOY = {"type": "toy", "name": "toy", "preset": "tiny", "n": 240, "seed": 4}
AGG_CHUNK = 40  # 240 samples -> 6 commits of the samples table
AGG_CODE = ("import json, sys; import tasks.aggregate.aggregate as agg; agg.CHUNK_ROWS = int(sys.argv[4]); "
            "print(agg.ingest_source.fn(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[5])))")


# the same writer, stopping itself (SIGSTOP) right after its first commit, so a test can set a fault up between two
# commits however fast the writer runs (polling the manifest once missed the window: all 6 commits landed first)
AGG_PAUSED_CODE = ("import os, signal\nimport tasks.aggregate.aggregate as agg\ncommit = agg._commit\n"
                   "def paused(*args):\n    commit(*args)\n    if not getattr(paused, 'done', False):\n"
                   "        paused.done = True\n        os.kill(os.getpid(), signal.SIGSTOP)\n"
                   "agg._commit = paused\n" + AGG_CODE.replace("; ", "\n"))


def _stopped(proc, seconds: float) -> bool:
    """Waits until `proc` is stopped (state T) and says whether it is; False once it has exited."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return True
        time.sleep(0.05)
    return False


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


PIPELINE_YAML = ("reward_steps: 10\neval_limit: 12\nexamples: 1\nrl: {rounds: 2, prompts_per_round: 4, group_size: 2, "
                 "norm_min_prompts: 8, checkpoint_every: 1}\n")
STAGE_TABLES = ("samples", "traces", "train_metrics", "rl_metrics", "eval_outputs")  # one per stage, in order


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

    t0 = time.monotonic()
    ref = _pipeline(tmp_path, "ref", f"pipe-ref-{tmp_path.name}")
    finish(ref, f"pipe-ref-{tmp_path.name}", tmp_path / "ref.log", timeout=1500)
    timing = [f"reference {time.monotonic() - t0:.0f} s"]
    data = str(tmp_path / "killed" / "data")
    kills = {"before any stage": after(3.0),
             "after the samples commit (aggregate)": commits_at_least(data, "samples", 1),
             "after a traces commit": commits_at_least(data, "traces", 1),
             "mid-SFT, after a metrics commit": commits_at_least(data, "train_metrics", 1),
             "after ParaRL round 0's commit": commits_at_least(data, "rl_metrics", 1),
             "mid-evaluation, after an outputs commit": commits_at_least(data, "eval_outputs", 1)}
    landed, seen = [], {}  # seen: commits of each stage's table when the kill landed
    for i, (where, cond) in enumerate(kills.items()):
        mark, t0 = f"pipe-{i}-{tmp_path.name}", time.monotonic()
        if kill_when(_pipeline(tmp_path, "killed", mark), cond, mark, timeout=900, poll=0.01):
            landed.append(where)
        seen[where] = [commits(data, t) for t in STAGE_TABLES]
        timing.append(f"kill {i} {time.monotonic() - t0:.0f} s")
    log, t0 = tmp_path / "killed.log", time.monotonic()
    finish(_pipeline(tmp_path, "killed", f"pipe-end-{tmp_path.name}"), f"pipe-end-{tmp_path.name}", log, timeout=900)
    timing.append(f"last run {time.monotonic() - t0:.0f} s")
    assert landed == list(kills), f"kills that never landed: {set(kills) - set(landed)}"
    # each kill landed in its stage: nothing committed before the first; each later one after its stage's first
    # commit and before the next stage's (the mid-evaluation kill: every earlier stage done)
    assert seen["before any stage"] == [0] * len(STAGE_TABLES), seen
    for i, where in enumerate(list(kills)[1:]):
        assert seen[where][i] >= 1 and seen[where][i + 1:] == [0] * (len(STAGE_TABLES) - i - 1), (where, seen)
    ref_data = str(tmp_path / "ref" / "data")  # ParaRL and evaluation were killed part-way (2 rounds, 4 outputs)
    assert seen["after ParaRL round 0's commit"][3] < commits(ref_data, "rl_metrics"), seen
    assert seen["mid-evaluation, after an outputs commit"][4] < commits(ref_data, "eval_outputs"), seen
    # the last run redid only what the last kill interrupted: every earlier stage came from its cache
    assert "stages: aggregate cached, fit-reward cached, traces cached, sft cached, pararl cached, evaluate ran" \
        in log.read_text(errors="replace").rsplit("ParaPipe run finished", 1)[-1]
    got = snapshot(data, out=str(tmp_path / "killed"))
    want = snapshot(ref_data, out=str(tmp_path / "ref"))
    assert all(want[t] for t in ("samples", "traces", "train_metrics", "rl_metrics", "trajectories", "eval_outputs"))
    rows = compare(got, want)
    assert _scores(log) == _scores(tmp_path / "ref.log") and len(_scores(log)) == 4
    for ckpt in glob.glob(str(tmp_path / "killed" / "**" / "final"), recursive=True) + \
            sorted(glob.glob(str(tmp_path / "killed" / "rl" / "checkpoints" / "*" / "round-*"))):
        assert from_pretrained(ckpt)[0] is not None, ckpt
    print(f"faults: pipeline, {len(kills)} kills landed in {len(landed)} places (commits of {STAGE_TABLES} when "
          f"each landed: {seen}), {rows} rows in {sum(bool(c) for c in want.values())} tables compared, "
          f"scores {_scores(log)}; {', '.join(timing)}")


# ------------------------------------------------------------------------------------------------ a second Ray node

@pytest.fixture(scope="module")
def two_nodes():
    """A Ray head with no CPUs (the driver, Ray Train's controller) and a second node with the 2 CPUs every
    worker and actor needs, each its own raylet on loopback; `replace()` SIGKILLs the second node's processes
    and adds a fresh one, as an autoscaler would replace a lost machine."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # a private temp_dir: the head's address is not recorded in /tmp/ray, so no other ray.init() on the machine joins
    head = {"num_cpus": 0, "include_dashboard": False, "temp_dir": f"/tmp/rfz-{os.getpid()}"}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = [cluster.add_node(num_cpus=2)]
    ray.init(address=cluster.address, log_to_driver=False)

    def replace():
        side = nodes.pop()
        cluster.remove_node(side, allow_graceful=False)
        nodes.append(cluster.add_node(num_cpus=2))
        return side.node_id
    replace.raylet_pid = lambda: nodes[-1].all_processes["raylet"][0].process.pid  # the second node's raylet
    yield replace
    ray.shutdown()
    cluster.shutdown()


def _with_node_loss(work, cond, replace, timeout: float = 900.0, poll: float = 0.05):
    """Runs work() in a thread; once cond() holds, replaces the second node from this (the main) thread, since
    starting a node installs signal handlers. Returns (work's result, the killed node's id or None)."""
    from concurrent.futures import ThreadPoolExecutor

    killed, deadline = None, time.monotonic() + timeout
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        while not future.done() and time.monotonic() < deadline:
            if killed is None and cond():
                killed = replace()
            time.sleep(poll)
        return future.result(timeout=max(1.0, deadline - time.monotonic())), killed


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _frozen_mid_call(gate, raylet_pid, title: str):
    """True once a worker of the node (a child of its raylet) runs the actor method `title` (Ray's process title,
    e.g. 'ray::RolloutWorker.sample', set for the call's duration) after gate() held: that worker is then
    SIGSTOPped, so the call cannot finish before the node is killed. `.frozen` holds its pid."""
    frozen, workers = [], []

    def check():
        if frozen or not gate():
            return bool(frozen)
        if not workers:
            workers.extend(p for p in _children(raylet_pid()) if _cmdline(p).startswith(title.split(".")[0]))
        for pid in workers:
            if _cmdline(pid).startswith(title):
                os.kill(pid, signal.SIGSTOP)
                if _cmdline(pid).startswith(title):  # still inside the call: it is held there
                    frozen.append(pid)
                    return True
                os.kill(pid, signal.SIGCONT)  # it returned in between: let it go, wait for the next call
        return False
    check.frozen = frozen
    return check


def _worker_nodes() -> set:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


def _step(path: str) -> int:
    try:
        with open(path) as f:
            return json.load(f)["step"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sft_survives_losing_the_node_its_workers_run_on(prepared, two_nodes):
    from model.checkpoint import from_pretrained

    root, out, _ = prepared
    before = _worker_nodes()
    ref = _fit(prepared, "node-ref")
    progress = os.path.join(out, "checkpoints", "node-killed", "progress.json")
    result, killed = _with_node_loss(lambda: _fit(prepared, "node-killed"), lambda: _step(progress) >= 6,
                                     two_nodes)  # past the step-4 checkpoint
    assert killed in before and killed not in _worker_nodes()
    assert ref["metrics"]["step"] == result["metrics"]["step"] == 12
    want, got = _losses(root, "node-ref"), _losses(root, "node-killed")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    assert from_pretrained(result["checkpoint"])[0] is not None
    print(f"faults: SFT lost node {killed[:8]} past step 6, 12 loss rows compared")


@pytest.mark.slow
def test_pararl_survives_losing_the_node_its_actors_run_on(sft_checkpoint, random_clip, two_nodes):
    from model.checkpoint import from_pretrained

    root = sft_checkpoint[0]
    result, _ = _run(sft_checkpoint, random_clip, "node-ref", "rl-node-ref")
    ref = _metrics(root, "node-ref")
    # once round 0's rows are committed its rollouts are over: the next sample call is round 1's. A rollout is a
    # fraction of a second on CPU, too short to hit with a timer, so the worker is held inside that call
    traj = os.path.join(root, "trajectories", "run=node-killed", "_manifest.json")
    cond = _frozen_mid_call(exists(traj), two_nodes.raylet_pid, "ray::RolloutWorker.sample")

    def lose_the_node():
        node = two_nodes()
        for pid in cond.frozen:  # the machine is gone: its held worker too (if its raylet's death left it)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return node
    before = _worker_nodes()
    result, killed = _with_node_loss(lambda: _run(sft_checkpoint, random_clip, "node-killed", "rl-node-killed")[0],
                                     cond, lose_the_node, poll=0.002)
    assert killed in before and killed not in _worker_nodes(), "the node was not lost mid-rollout in round 1"
    got = _metrics(root, "node-killed")
    assert got == ref
    rows = {t: len(read_table(root, t, run="node-killed")) for t in ("trajectories", "rewards", "rl_metrics")}
    assert rows == {t: len(read_table(root, t, run="node-ref")) for t in rows}
    assert from_pretrained(result["checkpoint"])[0] is not None
    secs = [r["rollout_s"] for run in ("node-ref", "node-killed")
            for r in read_table(root, "rl_metrics", run=run).to_pylist() if r["round"] == 1]
    print(f"faults: ParaRL lost node {killed[:8]} with its rollout worker (pid {cond.frozen[0]}) held inside round "
          f"1's sample call; round 1 rollouts took {secs[0]:.2f} s uninterrupted, {secs[1]:.2f} s with the loss; "
          f"{len(got)} metric rows equal, rows compared {rows}")


# ------------------------------------------------------------------------------------------------ storage faults

def _s3_commits(server, root: str) -> int:
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    try:
        body = server.client().get_object(Bucket=bucket, Key=f"{prefix}/samples/run=d/_manifest.json")["Body"]
        return len(json.loads(body.read())["shards"])
    except Exception:  # not yet written, or the server is down
        return 0


def _ends_within(proc, seconds: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    try:
        return proc.wait(timeout=seconds), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0


@pytest.mark.slow
def test_s3_server_hung_then_stopped_then_restarted_mid_write(agg_reference, tmp_path, monkeypatch):
    """SeaweedFS frozen (SIGSTOP: connections open, no answers) and then stopped mid-aggregation: the writer fails
    within a bound with an error naming S3, never hangs; after a restart on the same data, a re-run completes the
    dataset exactly (no row lost or duplicated, no half-written shard read)."""
    from tests.s3server import start_seaweedfs, stop_seaweedfs

    data, log = tmp_path / "weed", tmp_path / "agg.log"
    server = start_seaweedfs(data)
    root = f"s3://{server.bucket}/faults"
    try:
        outcomes = []
        for i, fault in enumerate(("hang", "stop")):
            proc = start(_agg_args(TOY, root), log, f"s3-{tmp_path.name}-{i}", env=server.env(),
                         code=AGG_PAUSED_CODE)
            assert _stopped(proc, 300), log.read_text()[-2000:]  # after its first commit in this process
            before = _s3_commits(server, root)
            assert 0 < before < TOY["n"] // AGG_CHUNK, before
            if fault == "hang":
                os.kill(server.pid, signal.SIGSTOP)
            else:
                stop_seaweedfs(server.pid)
            os.killpg(proc.pid, signal.SIGCONT)
            code, seconds = _ends_within(proc, 180)
            if fault == "hang":
                os.kill(server.pid, signal.SIGCONT)
                # the count the writer's error states is what the server holds: read it until it settles (a
                # read right after SIGCONT once returned the manifest one commit old)
                said = re.findall(r"while ingesting source 'toy' \(toy tiny\): (\d+) records committed",
                                  log.read_text(errors="replace"))
                settle = time.monotonic() + 15
                while said and _s3_commits(server, root) * AGG_CHUNK != int(said[-1]) and time.monotonic() < settle:
                    time.sleep(0.25)
                committed_at_hang = _s3_commits(server, root) * AGG_CHUNK
            if code is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            outcomes.append((fault, code, round(seconds, 1)))
            assert code not in (None, 0), f"{fault}: the writer {'hung' if code is None else 'succeeded'}: {outcomes}"
            if fault == "stop":
                server = start_seaweedfs(data)  # same data, new ports
        tail = log.read_text(errors="replace")
        for needle in ("Timeout was reached", "Could not connect to server", "in bucket 'parapipe-test'",
                       f"while ingesting source 'toy' (toy tiny): {committed_at_hang} records committed"):
            assert needle in tail, (needle, tail[-3000:])
        finish(start(_agg_args(TOY, root), log, f"s3-{tmp_path.name}-end", env=server.env(), code=AGG_CODE),
               f"s3-{tmp_path.name}-end", log, timeout=300)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        rows = compare(snapshot(root), agg_reference)
        assert rows == 240
        print(f"faults: S3 {outcomes} (fault, exit code, seconds to fail); {rows} rows compared after restart")
    finally:
        stop_seaweedfs(server.pid)
