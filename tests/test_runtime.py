"""Process hygiene: a SIGKILLed parapipe run leaves no Prefect server, Ray or other process behind.

Each run is started with a marker in its environment (PARAPIPE_TEST_MARK=<uuid>, inherited by every
descendant, independent of the guard's own token), killed with SIGKILL on its pid only, and then
/proc is searched for processes that still carry the marker.
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import tasks.aggregate.aggregate as agg
from flows.runtime import GUARD_ENV, descendants, process_table

pytestmark = pytest.mark.slow
CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)
# the CLI as users run it: main() installs the process guard itself
GUARDED_CLI = "from flows.cli import main; main()"


def _marked(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process started with PARAPIPE_TEST_MARK=mark."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"PARAPIPE_TEST_MARK={mark}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append((int(pid), f.read().replace(b"\0", b" ").decode(errors="replace")[:120]))
        except OSError:
            continue
    return out


def _start(code: str, args: list[str], mark: str, tmp_path) -> subprocess.Popen:
    """`python -c code *args` with the marker, its own Prefect home and no Prefect API of the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != GUARD_ENV}
    env.update(PARAPIPE_TEST_MARK=mark, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=open(tmp_path / "run.log", "w"),
                            stderr=subprocess.STDOUT)


def _wait_for(mark: str, needle: str, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if any(needle in cmd for _, cmd in _marked(mark)):
            return
        time.sleep(0.25)
    raise AssertionError(f"no {needle!r} process came up in {timeout}s")


def _kill_and_check(proc, mark: str, wait_s: float = 15.0) -> list:
    os.kill(proc.pid, signal.SIGKILL)  # the run's own process only: its children are not signalled
    proc.wait()
    deadline, left = time.monotonic() + wait_s, _marked(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _marked(mark)
    for pid, _ in left:  # do not leak them into the rest of the test session
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def test_a_killed_traces_run_leaves_no_prefect_server(tmp_path):
    root = str(tmp_path / "lake")
    agg.ingest_source.fn({"type": "toy", "name": "toy", "preset": "tiny", "n": 8, "seed": 2}, root, "d", CURATE)
    # an unreachable server with retries and back-off: the run is still busy when it is killed
    gen = '{"kind": "http", "base_url": "http://127.0.0.1:9/v1", "retries": 6, "timeout_s": 2}'
    mark = uuid.uuid4().hex
    proc = _start(GUARDED_CLI, ["traces", "--root", root, "--dataset", "d", "--generator", gen], mark, tmp_path)
    _wait_for(mark, "uvicorn", proc)  # Prefect's ephemeral API server is up
    time.sleep(2.0)
    assert any("uvicorn" in cmd for _, cmd in _marked(mark))
    left = _kill_and_check(proc, mark)
    assert left == [], f"outlived the run: {left}"


CLEAN_ENV_SCRIPT = """
import subprocess, sys, time
from flows.runtime import install_process_guard
install_process_guard()
# a child whose environment lacks the run's token, as a process that rewrote its environment block does
child = subprocess.Popen(["sleep", "600"], env={})
print("child", child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    return process_table().get(pid, (0, 0, "Z"))[2] != "Z"


def test_a_child_without_the_token_is_found_through_the_process_tree(tmp_path):
    proc = _start(CLEAN_ENV_SCRIPT, [], uuid.uuid4().hex, tmp_path)
    deadline = time.monotonic() + 60
    while "child" not in (log := (tmp_path / "run.log").read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, log
        time.sleep(0.1)
    child = int(log.split("child")[1].split()[0])
    time.sleep(1.5)  # the watchdog records the tree every POLL_S
    with open(f"/proc/{child}/environ", "rb") as f:
        assert GUARD_ENV.encode() not in f.read()  # only the tree can find it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "a child of the killed run without the token outlived it"


def test_descendants_walks_the_tree_and_process_table_reads_this_process():
    table = {1: (0, 10, "S"), 5: (1, 50, "S"), 6: (5, 60, "S"), 7: (6, 70, "Z"), 8: (1, 80, "S")}
    assert descendants(5, table) == {6: 60, 7: 70}
    assert descendants(8, table) == {}
    me = process_table()[os.getpid()]
    assert me[0] == os.getppid() and me[2] in "RS"
    assert os.getpid() in descendants(os.getppid(), process_table())


RAY_SCRIPT = """
import sys, time
from flows.runtime import install_process_guard
install_process_guard(tmp_dir=sys.argv[1])
import ray
ray.init(address="local", num_cpus=1, include_dashboard=True, log_to_driver=False)  # as run_sft: dashboard + agents
@ray.remote
def f():
    return 1
assert ray.get(f.remote()) == 1
print("ray up", flush=True)
time.sleep(600)
"""


def _ray_agents(root: int) -> list[int]:
    """Ray's dashboard and runtime-env agents under root (their command line is their process title)."""
    agents = []
    for pid in descendants(root, process_table()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and b"Agent" in cmd:
            agents.append(pid)
    return agents


def test_a_killed_run_leaves_no_ray_processes(tmp_path):
    mark = uuid.uuid4().hex
    short_tmp = tempfile.mkdtemp(prefix="pp-", dir="/tmp")  # a run's tmp folder, short enough for Ray's sockets
    proc = _start(RAY_SCRIPT, [short_tmp], mark, tmp_path)
    _wait_for(mark, "raylet", proc)
    deadline = time.monotonic() + 120
    while "ray up" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
        time.sleep(0.25)
    started = _marked(mark)
    assert any("gcs_server" in cmd for _, cmd in started) and len(started) >= 3
    assert glob.glob(os.path.join(short_tmp, "ray", "session_*"))  # Ray's temporary files follow TMPDIR
    # Ray's agents exit by themselves once the raylet is gone, unless the machine is slow: frozen, they stand for
    # agents that do not. setproctitle overwrote their environment block (the run's token, sometimes this test's
    # marker too), so only the process tree finds them, here and in the watchdog.
    deadline = time.monotonic() + 60
    while len(agents := _ray_agents(proc.pid)) < 2:
        assert time.monotonic() < deadline, _marked(mark)
        time.sleep(0.25)
    for pid in agents:
        os.kill(pid, signal.SIGSTOP)
    left = _kill_and_check(proc, mark, wait_s=60.0)  # returns as soon as none is left
    frozen = [pid for pid in agents if _alive(pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGKILL)
    assert left == [] and frozen == [], f"outlived the run: {left}, frozen agents {frozen}"
    shutil.rmtree(short_tmp, ignore_errors=True)
