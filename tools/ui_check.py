"""Look at ParaPipe's artifacts in the real Prefect UI: publish them from a finished run, screenshot their pages.

    python tools/ui_check.py --root runs/default/data --sft-run sft-toy-tiny --rl-run rl-toy-tiny \
        --rl-checkpoint runs/default/rl/checkpoints/rl-toy-tiny/round-00001 --out /tmp/ui-check

Starts `prefect server start` on loopback (UI on, a PREFECT_HOME of its own) unless --api names a running
server, runs a tiny flow that publishes the SFT loss chart, the ParaRL metric chart, the denoising trajectory
strips exactly as the flows do, runs the real `aggregate` flow twice on 16 toy samples (the second has
nothing to do: each run gets its own progress card, both at 100%), then opens
each artifact's page (and the flow run's Artifacts tab) in headless Chromium and saves PNGs under --out.
Prints one line per screenshot (with how many of the page's images the browser decoded) and exits 1 when
a page lacks its artifact's key or an image did not load. Needs Debian's `chromium`. The test suite does
the same on a toy run (tests/test_prefect_server.py, skipped without chromium), and
tests/test_ui_artifacts.py checks the artifacts' content and sizes without a browser.
"""
import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: str, log: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()  # the UI's pages call the API at PREFECT_API_URL: point it at this port
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    with open(log, "w") as out:
        proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json() is True:
                return proc, url
        except (httpx.HTTPError, ValueError):
            time.sleep(1)
        if proc.poll() is not None:
            break
    raise RuntimeError(f"prefect server did not come up; see {log}")


def publish(a: argparse.Namespace) -> str:
    """Runs the demo flow against PREFECT_API_URL; returns its flow run id."""
    from prefect import flow
    from prefect.runtime import flow_run

    from tasks.pipeline import ui_artifacts as ui

    @flow(name="ui-check")
    def ui_check() -> str:
        if a.sft_run:
            ui.publish_markdown(ui.stable_key("sft", a.sft_run, "loss"), ui.sft_loss_markdown, a.sft_root or a.root,
                                a.sft_run, a.out, description=f"SFT {a.sft_run}: loss per step")
        if a.rl_run:
            ui.publish_markdown(ui.stable_key("rl", a.rl_run, "chart"), ui.rl_metrics_markdown, a.root, a.rl_run, a.out,
                                description=f"ParaRL {a.rl_run}: per round")
            ui.publish_markdown(ui.stable_key("rl", a.rl_run, "trajectories"), ui.trajectory_markdown, a.root, a.rl_run,
                                a.out, a.rl_checkpoint, description=f"ParaRL {a.rl_run}: denoising strips")
        return flow_run.get_id()

    return ui_check()


def aggregate_twice(lake: str) -> list[str]:
    """The real aggregate flow on 16 toy samples, then again with nothing to do: two runs, two progress cards."""
    from flows.aggregate import aggregate

    sources = [{"type": "toy", "name": "toy-tiny", "preset": "tiny", "n": 16, "seed": 0}]
    return [str(aggregate(sources=sources, root=lake, dataset="ui-check", return_state=True).state_details.flow_run_id)
            for _ in range(2)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the lake the runs wrote (train_metrics, rl_metrics, trajectories)")
    p.add_argument("--sft-run", help="an SFT run id in train_metrics")
    p.add_argument("--sft-root", help="the SFT run's lake when it is not --root")
    p.add_argument("--rl-run", help="a ParaRL run id in rl_metrics / trajectories")
    p.add_argument("--rl-checkpoint", help="a checkpoint folder with image_tokenizer/ (to draw partial images)")
    p.add_argument("--out", default="/tmp/ui-check", help="folder for the charts and the screenshots")
    p.add_argument("--api", help="a running server's API URL (http://127.0.0.1:4200/api); default: start one")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to let each page load")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    server = None
    if a.api is None:
        server, url = start_server(os.path.join(a.out, "prefect-home"), os.path.join(a.out, "server.log"))
        a.api = f"{url}/api"
    os.environ["PREFECT_API_URL"] = a.api
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        from tools import ui_screenshot as browser

        runs = [publish(a), *aggregate_twice(os.path.join(a.out, "lake"))]
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
        ui = a.api.removesuffix("/api")
        pages = {}  # name -> (url, texts the page must show, how many images it must show)
        for x in arts:  # the default UI (v2) and the classic one (v1) render markdown differently: show both
            n_img = (x.data or "").count("(data:image/") if x.type == "markdown" else 0
            pages[f"v2-{x.key or x.id}"] = (f"{ui}/v2/artifacts/artifact/{x.id}", [x.key or str(x.id)], n_img)
            pages[f"v1-{x.key or x.id}"] = (f"{ui}/artifacts/artifact/{x.id}", [x.key or str(x.id)], n_img)
        pages["v1-flow-run-artifacts"] = (f"{ui}/runs/flow-run/{runs[0]}",
                                          [x.key for x in arts if x.key and str(x.flow_run_id) == runs[0]], 0)
        pages["v2-artifacts-list"] = (f"{ui}/v2/artifacts", ["Artifacts"], 0)
        problems = 0
        with browser.chromium((1400, 2400)) as call:
            for name, (url, texts, n_img) in pages.items():
                browser.goto(call, url)
                try:
                    if "/runs/" in url:
                        browser.wait_for_text(call, ["Artifacts"], a.wait * 4)
                        browser.click_until(call, "Artifacts", texts, a.wait * 4)
                    else:
                        browser.wait_for_text(call, texts, a.wait * 4)
                except TimeoutError as e:
                    problems += 1
                    print(f"PROBLEM {name}: {str(e).splitlines()[0]}")
                imgs = browser.wait_for_images(call, n_img)
                broken = [i["alt"] for i in imgs if not browser.loaded(i)] + ["(missing)"] * (n_img - len(imgs))
                problems += bool(broken)
                path = browser.capture(call, os.path.join(a.out, f"{name}.png"))
                print(f"{path}  <- {url}  ({sum(map(browser.loaded, imgs))} images loaded"
                      + (f", NOT LOADED: {broken})" if broken else ")"))
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
