"""Process hygiene for a parapipe run: nothing it starts outlives it, even when it is SIGKILLed.

A run starts long-lived helpers: Prefect's ephemeral API server (a `uvicorn` subprocess Prefect
starts when PREFECT_API_URL is unset and stops only from an atexit hook), Ray's local cluster
(gcs_server, raylet, dashboard agents, workers) and vLLM's engine processes. A SIGKILL skips every
atexit hook, so they keep running (Prefect's server alone holds ~200 MB and a port).

`install_process_guard()` marks the run's environment with a token (`PARAPIPE_RUN_GUARD`), which
every child and grandchild inherits, and starts a tiny watchdog process (this file run as a script:
standard library only, no Prefect, no torch). The watchdog waits for the run's process to end, by
any means, then sends SIGTERM (and SIGKILL after `GRACE_S`) to every process whose environment
carries the token or that it saw in the run's process tree (it records the tree every `POLL_S`: a
process that rewrites its own environment block, as setproctitle does for Ray's agents, loses the
token but not its place in the tree). On a normal exit Prefect and Ray have already stopped their
processes, and the watchdog finds nothing to do. The marker is matched in /proc/<pid>/environ, the environment a
process started with, so it works across sessions and process groups and after re-parenting.
Linux only (/proc); elsewhere the guard is a no-op that says so.

Leaves out: temporary files. Each stage writes its own under the run's folder (tasks/sft/sft.py puts
Ray Train's checkpoint staging under `{out}/tmp`); `install_process_guard(tmp_dir=...)` also points
TMPDIR there for the whole process tree.
"""
import os
import signal
import subprocess
import sys
import time
import uuid

GUARD_ENV = "PARAPIPE_RUN_GUARD"
GRACE_S = 5.0
"""Seconds between SIGTERM and SIGKILL for a process that outlived its run."""
POLL_S = 0.5
"""How often the watchdog checks that the run's process is still alive."""
LATE_S = 8.0
"""Seconds of extra SIGKILL sweeps after those two rounds, for children still being spawned (Ray's agents)."""
RAY_TMP_ROOM = 40
"""Longest tmp_dir Ray can use: it adds ~66 bytes (ray/session_<date>_<pid>/sockets/plasma_store) of 107."""


def install_process_guard(tmp_dir: str | None = None) -> str | None:
    """Starts the watchdog for this process (once per process); returns the run's token.

    Args:
        tmp_dir: when given, TMPDIR for this process and its children (created if missing), so
            temporary files land under the run's folder. Keep it short: Ray puts Unix sockets under
            it, and a socket path has at most 107 bytes.
    """
    if tmp_dir is not None:
        import tempfile

        tmp_dir = os.path.abspath(tmp_dir)
        os.makedirs(tmp_dir, exist_ok=True)
        os.environ["TMPDIR"] = tmp_dir  # Python's tempfile, Ray (its session folder), torch, vLLM
        tempfile.tempdir = None  # re-read TMPDIR on the next call
        if len(tmp_dir) > RAY_TMP_ROOM:  # Ray's socket paths would pass the 107-byte limit
            os.environ.setdefault("RAY_TMPDIR", "/tmp")
            print(f"parapipe: {tmp_dir} is too long a path for Ray's sockets; Ray's session folder stays in /tmp",
                  file=sys.stderr)
    if not os.path.isdir("/proc/self"):
        print("parapipe: no /proc here; processes a killed run started are not cleaned up", file=sys.stderr)
        return None
    token = os.environ.get(GUARD_ENV, "")
    if token.startswith(f"{os.getpid()}-"):
        return token  # already guarding this process
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if k != GUARD_ENV}  # the watchdog must not match itself
    subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), str(os.getpid()), token], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # a Ctrl-C in the terminal does not reach it
    os.environ[GUARD_ENV] = token
    return token


def guarded_pids(token: str) -> list[int]:
    """Processes whose starting environment carries `PARAPIPE_RUN_GUARD=token`."""
    marker = f"{GUARD_ENV}={token}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state letter) of every live process, from /proc/<pid>/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the command name before ')' may hold spaces
        except (OSError, IndexError):
            continue
        table[int(name)] = (int(fields[1]), int(fields[19]), fields[0].decode())  # fields 4, 22 and 3 of proc(5)
    return table


def descendants(root: int, table: dict[int, tuple[int, int, str]]) -> dict[int, int]:
    """pid -> start time of every live descendant of root in table."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            todo += children.get(pid, [])
    return found


def _targets(token: str, seen: dict[int, int]) -> list[int]:
    """Live, non-zombie processes to stop: those carrying the token, those seen in the run's process tree (same
    pid and start time, so a reused pid is spared), and all descendants of either."""
    table = process_table()
    roots = set(guarded_pids(token)) | {p for p, st in seen.items() if p in table and table[p][1] == st}
    for pid in list(roots):
        roots |= set(descendants(pid, table))
    roots.discard(os.getpid())
    return sorted(p for p in roots if p in table and table[p][2] != "Z")


def reap(token: str, grace_s: float = GRACE_S, seen: dict[int, int] | None = None) -> list[int]:
    """SIGTERM the run's leftover processes, SIGKILL those still alive after grace_s; returns the pids found.

    A leftover carries the run's token in its starting environment, or is in `seen` (pid -> start time, the
    watchdog's record of the run's process tree). The token alone is not enough: Ray's agents set their
    process title with setproctitle, which overwrites the memory /proc/<pid>/environ is read from.
    """
    seen = seen or {}
    found = _targets(token, seen)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        alive = _targets(token, seen)
        _signal(alive, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = _targets(token, seen)
        found += [p for p in alive if p not in found]
    deadline = time.monotonic() + LATE_S  # children some of them were still spawning (Ray's agents): sweep again
    while time.monotonic() < deadline:
        late = _targets(token, seen)
        _signal(late, signal.SIGKILL)
        found += late
        time.sleep(0.5)
    return sorted(set(found))


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _watch(parent: int, token: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    seen: dict[int, int] = {}  # the run's process tree as last seen: pid -> start time
    while os.getppid() == parent:  # re-parented once the run's process is gone
        table = process_table()
        seen = {p: st for p, st in seen.items() if p in table and table[p][1] == st}
        seen.update(descendants(parent, table))
        time.sleep(POLL_S)
    reap(token, seen=seen)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
