"""prefect.yaml the way a user runs it: `prefect server start` (UI on), `python -m flows.deploy pools`
(= make pools), `prefect deploy`, `prefect worker start`, `prefect deployment run`; the run completes
with its artifacts and the server serves the UI. Then the UI the way a person looks at it: a run's
artifacts (progress card, table, SFT / ParaRL charts, denoising strips) opened in headless Chromium,
checked by the text the browser shows, the images it decoded and its screenshots. All on loopback, in a
PREFECT_HOME of its own, one server for the module."""
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone

import httpx
import pytest
from PIL import Image, ImageChops, ImageStat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/ is a folder of scripts, not part of the installed package
from tools import ui_screenshot as browser  # noqa: E402

pytestmark = pytest.mark.slow
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` with the UI on a free loopback port, in a PREFECT_HOME of its own, shared by this
    module's tests. Yields (url, env): env is what the CLI, the worker and flows need to use that server."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_TO_API_ENABLED": "true", "PARAPIPE_HOME": ROOT}
    log = str(tmp / "server.log")
    with _spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log, str(tmp)) as proc:
        _wait_healthy(url, proc, log)
        yield url, env


def test_deployment_runs_through_a_worker_on_a_real_server(server, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    url, env = server
    lake = tmp_path / "lake"
    params = {"root": str(lake), "sources": [{"type": "toy", "name": "toy-tiny", "preset": "tiny", "n": N, "seed": 0}]}
    worker_log = str(tmp_path / "worker.log")
    with ExitStack() as stack:
        pools = _run([sys.executable, "-m", "flows.deploy", "pools"], env, ROOT)
        assert "'parapipe-local' created" in pools and "'parapipe-gpu' created" in pools, pools
        _run([PREFECT, "--no-prompt", "deploy", "--name", "aggregate-toy-nightly"], env, ROOT)
        stack.enter_context(_spawn([PREFECT, "worker", "start", "--pool", "parapipe-local"], env, worker_log,
                                   str(tmp_path)))  # the pull step, not the worker's folder, finds the checkout
        started = _run([PREFECT, "deployment", "run", "aggregate/aggregate-toy-nightly", "--params",
                        json.dumps(params)], env, str(tmp_path))
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        with SyncPrefectClient(f"{url}/api") as client:
            run = _wait_final(client, run_id, worker_log)
            assert run.state.is_completed(), f"{run.state}\n{_tail(worker_log)}"
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


# ---------------------------------------------------------------------------------------------- the UI in a browser

VIEW = (1400, 2000)  # viewport px: the tallest page checked (two strips) fits
UIS = {"v2": "v2/", "v1": ""}  # URL prefix of the default UI (v2) and of the classic one, where "View at" links go
NO_CHROMIUM = ("needs Chromium, a system package outside the Python environment, and `chromium` is not on PATH: "
               "install it with `apt-get install chromium` (Debian)")
DATA_URI = re.compile(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _write_lake(root: str) -> None:
    """What an SFT run and a ParaRL run leave in the lake, in miniature: loss per step, metrics per round,
    two rounds of denoising trajectories (2 rollouts x 3 recorded steps, 4x4 image codes)."""
    from storage.parquet import write_rows

    now = datetime.now(timezone.utc)
    write_rows(root, "train_metrics", [{"run_id": "sft-ui", "step": s, "loss": 10.0 / s, "loss_text": 4.0 / s,
                                        "loss_image": 6.0 / s, "time": now} for s in range(1, 41)], run="sft-ui")
    write_rows(root, "rl_metrics", [{"run_id": "rl-ui", "round": r, "reward_mean": 0.3 + 0.1 * r, "kl": 0.01 * r,
                                     "heldout_agreement": 0.5 + 0.1 * r, "heldout_exact_image": 0.2 + 0.1 * r}
                                    for r in range(4)], run="rl-ui")
    write_rows(root, "trajectories", [
        {"run_id": "rl-ui", "round": rnd, "sample_id": sample, "group_index": 0, "step": step, "slot": k,
         "text": "the red square is at b2"[: 8 * (k + 1)], "image_codes": [-1] * (12 - 6 * k) + list(range(4 + 6 * k)),
         "text_mask_frac": 0.5 - 0.25 * k, "image_mask_frac": (12 - 6 * k) / 16, "instruction": f"recolour {sample}",
         "reward": 0.3 + 0.2 * k}
        for rnd in range(2) for sample in ("s0", "s1") for k, step in enumerate((2, 5, 7))], run="rl-ui")


def publish_artifacts(lake: str, out: str) -> str:
    """One flow run that publishes ParaPipe's artifacts as the flows do: the aggregate flow's progress card
    and summary table (its body, on 16 toy samples), the SFT loss chart, the ParaRL chart and the denoising
    strips. Returns the flow run id. Runs in a process of its own (see _publish)."""
    from prefect import flow
    from prefect.runtime import flow_run

    from flows.aggregate import aggregate
    from tasks.pipeline import ui_artifacts as ui

    @flow(name="ui-browser")
    def publish() -> str:
        _write_lake(lake)
        aggregate.fn(sources=[{"type": "toy", "name": "toy-tiny", "preset": "tiny", "n": N, "seed": 0}],
                     root=lake, dataset="ui-check")
        ui.publish_markdown(ui.stable_key("sft", "sft-ui", "loss"), ui.sft_loss_markdown, lake, "sft-ui", out,
                            description="SFT sft-ui: loss per step")
        ui.publish_markdown(ui.stable_key("rl", "rl-ui", "chart"), ui.rl_metrics_markdown, lake, "rl-ui", out,
                            description="ParaRL rl-ui: per round")
        ui.publish_markdown(ui.stable_key("rl", "rl-ui", "trajectories"), ui.trajectory_markdown, lake, "rl-ui",
                            out, None, description="ParaRL rl-ui: denoising strips")
        return flow_run.get_id()

    return publish()


def _publish(env: dict, lake: str, out: str) -> str:
    """publish_artifacts in a fresh Python process pointed at the server, as a user's script would be. Not in
    this one: Prefect keeps one event worker per process, and an earlier test's may still be bound to the
    test harness's server, which then gets this run's task-run and artifact events (the UI showed a run with
    no task runs and an empty Artifacts tab)."""
    code = ("import sys; from tests.test_prefect_server import publish_artifacts; "
            "print('FLOW RUN', publish_artifacts(sys.argv[1], sys.argv[2]))")
    printed = _run([sys.executable, "-c", code, lake, out], env, ROOT, timeout=300)
    return re.search(r"FLOW RUN ([0-9a-f-]{36})", printed).group(1)


# what each artifact's page must show (whitespace squashed): the numbers a person reads off it
EXPECT = {
    "ui-check-progress": ["Progress: 100%", "ui-check: 16 new samples, 16 in all"],
    "aggregate-ui-check": ["source read accepted already_present quarantined", "toy-tiny 16 16 0 0", "ok",
                           "TOTAL (dataset) 16 0"],
    "sft-sft-ui-loss": ["SFT sft-ui: training loss per step", "loss 10 0.25 0.25 10", "loss_image 6 0.15 0.15 6"],
    "rl-rl-ui-chart": ["ParaRL rl-ui: per round", "reward_mean 0.3 0.6 0.3 0.6", "kl 0 0.03 0 0.03",
                       "heldout_agreement 0.5 0.8 0.5 0.8"],
    "rl-rl-ui-trajectories": ["ParaRL rl-ui: denoising trajectories", "round 0", "round 1",
                              "grey = still masked"],
}


def _check_screenshot(path: str) -> Image.Image:
    """A real page, not a blank or half-drawn one: the viewport's size, many colours, no colour covering it."""
    with Image.open(path) as im:
        shot = im.convert("RGB")
    colours = shot.getcolors(VIEW[0] * VIEW[1])
    top = max(colours)[0] / (VIEW[0] * VIEW[1])
    assert shot.size == VIEW and len(colours) > 64 and top < 0.99, (path, shot.size, len(colours), top)
    return shot


def _check_images_drawn(shot: Image.Image, imgs: list[dict], embedded: list[Image.Image], page: str) -> None:
    """Each <img> decoded at the embedded PNG's size, and the screenshot shows that PNG, pixel for pixel, where
    the <img> is (every image drawn unscaled inside the viewport; at least the first one)."""
    assert [(i["naturalWidth"], i["naturalHeight"]) for i in imgs] == [e.size for e in embedded], (page, imgs)
    compared = 0
    for img, png in zip(imgs, embedded):
        assert browser.loaded(img), (page, img)
        x, y = round(img["x"]), round(img["y"])
        if (img["width"], img["height"]) != png.size or x < 0 or y < 0 or y + png.height > VIEW[1]:
            continue
        seen = shot.crop((x, y, x + png.width, y + png.height))
        diff = ImageStat.Stat(ImageChops.difference(seen, png.convert("RGB"))).mean
        assert max(diff) < 2.0, (page, img, diff)
        compared += 1
    assert compared or not embedded, (page, "no image drawn unscaled in the viewport", imgs)


def _capture_drawn(call, path: str, embedded: list[Image.Image], page: str, timeout_s: float = 20.0) -> None:
    """Screenshot once the page has settled: an image can be decoded (complete) a frame or two before it is
    painted, and the layout can still move as the page finishes, so the <img> boxes are read right after the
    capture and the comparison is retried until it holds or timeout_s has passed (then it fails as it is)."""
    deadline = time.monotonic() + timeout_s
    while True:
        shot = _check_screenshot(browser.capture(call, path))
        imgs = browser.page_images(call)
        try:
            return _check_images_drawn(shot, imgs, embedded, page)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@pytest.mark.skipif(browser.browser_path() is None, reason=NO_CHROMIUM)
def test_ui_pages_show_the_run_in_headless_chromium(server, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    url, env = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    run_id = _publish(env, str(tmp_path / "lake"), str(tmp_path / "out"))
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    expect = {a.key: next(v for k, v in EXPECT.items() if k in a.key) for a in arts}
    assert len(arts) == 5 and {a.type for a in arts} == {"progress", "table", "markdown"}, [a.key for a in arts]
    with browser.chromium(VIEW) as call:
        for name, prefix in UIS.items():  # the run's page, Artifacts tab: every artifact's key and description
            browser.goto(call, f"{url}/{prefix}runs/flow-run/{run_id}")
            browser.wait_for_text(call, ["Completed", "Artifacts"])
            browser.click_until(call, "Artifacts", [a.key for a in arts] + [a.description for a in arts])
            assert "tab=Artifacts" in browser.evaluate(call, "location.href"), name
            time.sleep(3)  # the run graph above the tabs is a canvas, still drawing when the text is there
            _check_screenshot(browser.capture(call, str(shots / f"{name}-run-artifacts.png")))
        # each artifact's own page
        for a in arts:
            embedded = [Image.open(io.BytesIO(base64.b64decode(b))) for b in DATA_URI.findall(a.data or "")] \
                if a.type == "markdown" else []
            for name, prefix in UIS.items():
                page = f"{url}/{prefix}artifacts/artifact/{a.id}"
                browser.goto(call, page)
                browser.wait_for_text(call, [a.key, a.description, *expect[a.key]])
                browser.wait_for_images(call, len(embedded))
                _capture_drawn(call, str(shots / f"{name}-{a.key}.png"), embedded, page)
    print(f"screenshots: {shots}")
