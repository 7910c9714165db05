"""Screenshot a Prefect UI page with headless Chromium (Debian's `chromium` package), over the DevTools protocol.

    python tools/ui_screenshot.py http://127.0.0.1:4200/runs/flow-run/<id> /tmp/ui-run.png --click Artifacts

The page is a single-page app that fills itself in after loading, so the script waits `--wait` seconds,
optionally clicks the element whose whole text is `--click` (a tab such as Artifacts or Logs), waits
again and saves a PNG. Needs only the standard library and `websockets` (a Prefect dependency).
"""
import argparse
import base64
import itertools
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

CLICK_JS = ("(() => {{ const hits = [...document.querySelectorAll('button, a, [role=tab], li, span, div')]"
            ".filter(e => e.textContent.trim() === {text}); if (hits.length) hits[hits.length - 1].click();"
            " return hits.length; }})()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_socket(port: int, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
            return next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
        except (OSError, StopIteration, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"headless chromium did not open its DevTools port {port} within {timeout_s:.0f} s")


def screenshot(url: str, out: str, click: str | None = None, wait_s: float = 8.0, size=(1600, 1100)) -> int:
    """Saves a PNG of `url` to `out`; returns how many elements matched `click` (0 without one)."""
    from websockets.sync.client import connect

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("no chromium on PATH: install Debian's package (apt-get install chromium)")
    port = _free_port()
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--hide-scrollbars", f"--remote-debugging-port={port}", f"--window-size={size[0]},{size[1]}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ids = itertools.count(1)
    try:
        with connect(_page_socket(port), max_size=None) as ws:
            def call(method: str, **params) -> dict:
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while (m := json.loads(ws.recv())).get("id") != i:
                    pass
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

            call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            time.sleep(wait_s)
            hits = 0
            if click:
                expr = CLICK_JS.format(text=json.dumps(click))
                hits = call("Runtime.evaluate", expression=expr, returnByValue=True)["result"]["value"]
                time.sleep(wait_s / 2)
            with open(out, "wb") as f:
                f.write(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
            return hits
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--click", help="whole visible text of a tab or button to click first, e.g. Artifacts")
    p.add_argument("--wait", type=float, default=8.0, help="seconds to let the page load (default 8)")
    a = p.parse_args()
    hits = screenshot(a.url, a.out, a.click, a.wait)
    if a.click and not hits:
        print(f"nothing on the page reads {a.click!r}; saved the page as it is", file=sys.stderr)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
