"""Fault injection for tests/test_faults.py: run a stage in its own process group, SIGKILL the group when a
condition on its outputs holds (the Nth commit of a table, a checkpoint folder, a delay), and snapshot every table
so a resumed run can be compared with an uninterrupted one row key by row key.

Holds: `start` (a guarded `parapipe` command or a `python -c` stage script, marked for clean-up), `kill_when`,
conditions (`commits_at_least`, `exists`, `after`), `snapshot` / `compare` of a lake's tables.
Leaves out: the stages themselves and their configs (in the tests).
"""
import collections
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.runtime import descendants, process_table
from tests.test_runtime import GUARDED_CLI, _marked

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.05
HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}\b")  # pipeline run ids end in 8 hex digits of their stage key


def start(argv: list[str], log: Path, mark: str, env: dict | None = None, code: str = GUARDED_CLI,
          cwd: Path | None = None) -> subprocess.Popen:
    """`python -c code *argv` in a new session (its own process group), with PARAPIPE_TEST_MARK=mark.

    The default code is test_runtime's guarded CLI: `parapipe` with its process watchdog installed."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "PARAPIPE_RUN_GUARD"}
    full.update(PARAPIPE_TEST_MARK=mark, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=full, cwd=cwd or ROOT, start_new_session=True,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _left(mark: str, seen: dict[int, int]) -> list[tuple[int, str]]:
    """Live processes with the mark, or seen in the killed run's tree (same pid and start time, not a zombie):
    setproctitle (Ray's agents) can wipe the mark from /proc/<pid>/environ, so the mark alone misses some."""
    table = process_table()
    left = dict(_marked(mark))
    left.update({p: "(seen in the run's process tree)" for p, st in seen.items()
                 if p in table and table[p][1] == st and table[p][2] != "Z"})
    return sorted(left.items())


def reap_marked(mark: str, wait_s: float = 15.0, seen: dict[int, int] | None = None) -> list:
    """Waits for every process started with the mark or in `seen` (pid -> start time) to end (the watchdog's
    work), then SIGKILLs the rest."""
    seen = seen or {}
    deadline, left = time.monotonic() + wait_s, _left(mark, seen)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _left(mark, seen)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def kill_when(proc: subprocess.Popen, cond, mark: str, timeout: float = 600.0, poll: float = POLL_S) -> bool:
    """SIGKILLs proc's process group as soon as cond() is true; False if proc ended first (nothing killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            seen = descendants(proc.pid, process_table())
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            reap_marked(mark, seen=seen)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    seen = descendants(proc.pid, process_table())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reap_marked(mark, seen=seen)
    raise AssertionError(f"condition not met within {timeout}s")


def finish(proc: subprocess.Popen, mark: str, log: Path, timeout: float = 900.0) -> None:
    """Waits for an uninterrupted run and asserts it succeeded (the log's tail in the message)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    reap_marked(mark)
    assert rc == 0, f"run ended with {rc}:\n{log.read_text(errors='replace')[-3000:]}"


# ------------------------------------------------------------------------------------------------ conditions

def commits(root: str, table: str) -> int:
    """Committed shards of a local table over all its runs (what the manifests list)."""
    n = 0
    for path in glob.glob(os.path.join(root, table, "run=*", "_manifest.json")):
        try:
            with open(path) as f:
                n += len(json.load(f)["shards"])
        except (OSError, ValueError):  # mid-replace: count it on the next poll
            pass
    return n


def commits_at_least(root: str, table: str, n: int):
    return lambda: commits(root, table) >= n


def exists(pattern: str):
    return lambda: bool(glob.glob(pattern))


def after(seconds: float):
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0 >= seconds


def then(cond, seconds: float):
    """True `seconds` after cond() was first seen true: somewhere in the work that follows a commit."""
    seen = []

    def check():
        if not seen and cond():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= seconds
    return check


def uncommitted_shard(root: str, table: str):
    """True while a shard of a local table is written but not yet listed in its manifest: mid-commit."""
    def check():
        for part in glob.glob(os.path.join(root, table, "run=*")):
            files = {n for n in os.listdir(part) if n.endswith(".parquet") or ".tmp-" in n}
            try:
                with open(os.path.join(part, "_manifest.json")) as f:
                    listed = {s["file"] for s in json.load(f)["shards"]}
            except (OSError, ValueError):
                listed = set()
            if files - listed:
                return True
        return False
    return check


# ------------------------------------------------------------------------------------------------ comparing tables

def _norm(value, out: str):
    if isinstance(value, str):
        return HASH_SUFFIX.sub("-<key>", value.replace(out, "<out>"))
    return value


def snapshot(root: str, skip: tuple[str, ...] = ("runs",), out: str = "\0") -> dict[str, collections.Counter]:
    """{table: Counter of (run, *key columns)} over every committed row of a lake; run ids and paths under `out`
    normalised so two runs of the pipeline (different stage keys, different folders) compare."""
    from storage.parquet import list_runs, read_table
    from storage.schema import KEYS, TABLES

    snap = {}
    for table in TABLES:
        if table in skip:
            continue
        counter = collections.Counter()
        for run in list_runs(root, table):
            rows = read_table(root, table, run=run, columns=list(KEYS[table])).to_pylist()
            counter.update((_norm(run, out), *(_norm(r[k], out) for k in KEYS[table])) for r in rows)
        snap[table] = counter
    return snap


def compare(got: dict, want: dict) -> int:
    """Asserts the same rows (with multiplicity) table by table; returns the number of rows compared."""
    for table in want:
        dup = {k: n for k, n in got[table].items() if n > 1}
        assert not dup, f"{table}: {len(dup)} keys duplicated, e.g. {list(dup)[:3]}"
        lost, extra = want[table] - got[table], got[table] - want[table]
        assert not lost and not extra, (f"{table}: {sum(lost.values())} rows lost (e.g. {list(lost)[:3]}), "
                                        f"{sum(extra.values())} extra (e.g. {list(extra)[:3]})")
    return sum(sum(c.values()) for c in want.values())
