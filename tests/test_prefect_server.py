"""prefect.yaml the way a user runs it: `prefect server start` (UI on), `python -m flows.deploy pools`
(= make pools), `prefect deploy`, `prefect worker start`, `prefect deployment run`; the run completes
with its artifacts and the server serves the UI. All on loopback, in a PREFECT_HOME of its own."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")
SERVER_START_S, RUN_S, N = 300, 300, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


@contextmanager
def _spawn(cmd: list[str], env: dict, log: str, cwd: str):
    """A background process in its own process group, stopped (group and all) on the way out."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _run(cmd: list[str], env: dict, cwd: str, timeout: int = 180) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout + done.stderr


def _wait_healthy(url: str, proc, log: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json() is True:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"prefect server did not come up (exit {proc.poll()}):\n{_tail(log)}")


def _wait_final(client, run_id: str, worker_log: str):
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {RUN_S} s; worker log:\n{_tail(worker_log)}")


def test_deployment_runs_through_a_worker_on_a_real_server(tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_TO_API_ENABLED": "true", "PARAPIPE_HOME": ROOT}
    lake = tmp_path / "lake"
    params = {"root": str(lake), "sources": [{"type": "toy", "name": "toy-tiny", "preset": "tiny", "n": N, "seed": 0}]}
    logs = {name: str(tmp_path / f"{name}.log") for name in ("server", "worker")}
    with ExitStack() as stack:
        server = stack.enter_context(_spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                            env, logs["server"], str(tmp_path)))
        _wait_healthy(url, server, logs["server"])
        pools = _run([sys.executable, "-m", "flows.deploy", "pools"], env, ROOT)
        assert "'parapipe-local' created" in pools and "'parapipe-gpu' created" in pools, pools
        _run([PREFECT, "--no-prompt", "deploy", "--name", "aggregate-toy-nightly"], env, ROOT)
        stack.enter_context(_spawn([PREFECT, "worker", "start", "--pool", "parapipe-local"], env, logs["worker"],
                                   str(tmp_path)))  # the pull step, not the worker's folder, finds the checkout
        started = _run([PREFECT, "deployment", "run", "aggregate/aggregate-toy-nightly", "--params",
                        json.dumps(params)], env, str(tmp_path))
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        with SyncPrefectClient(f"{url}/api") as client:
            run = _wait_final(client, run_id, logs["worker"])
            assert run.state.is_completed(), f"{run.state}\n{_tail(logs['worker'])}"
            artifacts = {a.key: a for a in client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))}
        assert run.parameters["root"] == str(lake) and run.parameters["dataset"] == "toy-tiny"  # deployed + override
        [progress] = [a for k, a in artifacts.items() if k.startswith("aggregate-toy-tiny-progress-")]
        assert float(progress.data) == 100.0
        rows = json.loads(artifacts["aggregate-toy-tiny"].data)
        assert (rows[0]["source"], rows[0]["read"], rows[0]["accepted"], rows[0]["status"]) == ("toy-tiny", N, N, "ok")
        assert os.path.isdir(lake / "samples" / "run=toy-tiny")
        # the UI: a browser's visit to the run's page gets the single-page app, the root redirects to the new UI
        page = httpx.get(f"{url}/runs/flow-run/{run_id}", headers={"Accept": "text/html"}, timeout=30)
        assert page.status_code == 200 and "<title>Prefect Server</title>" in page.text
        home = httpx.get(f"{url}/", headers={"Accept": "text/html"}, timeout=30, follow_redirects=True)
        assert home.status_code == 200 and "<title>Prefect Server</title>" in home.text, home.url
        assert httpx.get(f"{url}/api/health", timeout=10).json() is True
