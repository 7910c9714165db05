"""Drive a Prefect UI page in headless Chromium (Debian's `chromium` package) over the DevTools protocol.

    python tools/ui_screenshot.py http://127.0.0.1:4200/runs/flow-run/<id> /tmp/ui-run.png --click Artifacts

The page is a single-page app that fills itself in after loading: the script waits `--wait` seconds (or
until `--expect` text shows), optionally clicks the element whose whole text is `--click` (a tab such as
Artifacts or Logs), waits again and saves a PNG. The small functions below (`chromium`, `goto`,
`page_text`, `wait_for_text`, `click_text`, `click_until`, `page_images`, `capture`) are what tools/ui_check.py and
tests/test_prefect_server.py use to look at a page the way a person does: its visible text, whether its
images loaded, a screenshot. Needs only the standard library and `websockets` (a Prefect dependency).
"""
import argparse
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

MISSING = "no chromium on PATH: install Debian's package (apt-get install chromium)"
FIND_JS = ("(() => {{ const hits = [...document.querySelectorAll('button, a, [role=tab], li, span, div')]"
           ".filter(e => e.textContent.trim() === {text} && e.getClientRects().length);"
           " if (!hits.length) return null; const e = hits[hits.length - 1]; e.scrollIntoView({{block: 'center'}});"
           " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2, hits.length]; }})()")
TEXT_JS = "document.body ? document.body.innerText : ''"
IMAGES_JS = ("[...document.images].map(i => { const r = i.getBoundingClientRect(); return {"
             "src: i.currentSrc.slice(0, 40), alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,"
             " naturalHeight: i.naturalHeight, x: r.left, y: r.top, width: r.width, height: r.height}; })")


def browser_path() -> str | None:
    """Debian's chromium (or chromium-browser) on PATH, else None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_socket(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
            return next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
        except (OSError, StopIteration, ValueError):
            time.sleep(0.5)
    raise RuntimeError(f"headless chromium (exit {proc.poll()}) did not open its DevTools port {port} "
                       f"within {timeout_s:.0f} s")


@contextmanager
def chromium(size: tuple[int, int] = (1600, 1100)):
    """Headless Chromium with one page of `size` (width, height) px; yields call(method, **params) -> result,
    a DevTools command on that page. The browser is stopped on the way out."""
    from websockets.sync.client import connect

    browser = browser_path()
    if browser is None:
        raise FileNotFoundError(MISSING)
    port = _free_port()
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--hide-scrollbars", "--no-first-run", f"--remote-debugging-port={port}",
                             f"--window-size={size[0]},{size[1]}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ids = itertools.count(1)
    try:
        with connect(_page_socket(port, proc), max_size=None, open_timeout=30) as ws:
            def call(method: str, **params) -> dict:
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while (m := json.loads(ws.recv(timeout=60))).get("id") != i:
                    pass  # events and other replies
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

            call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
            yield call
    finally:  # the browser and its renderer / zygote children: the process group it was started in
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def evaluate(call, expression: str):
    """The value of a JavaScript expression on the page (JSON-able values only)."""
    r = call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in r:
        raise RuntimeError(f"{expression[:60]}...: {r['exceptionDetails'].get('text')}")
    return r["result"].get("value")


def goto(call, url: str, timeout_s: float = 30.0) -> None:
    """Navigates to `url` and returns once the new document is there (not the one it replaces, whose text
    could otherwise satisfy a wait_for_text meant for the new page); the app may still be filling it in."""
    evaluate(call, "window.__uiShotOld = true")
    call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout_s
    while not _try(call, "window.__uiShotOld !== true && document.readyState !== 'loading'"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not load within {timeout_s:.0f} s")
        time.sleep(0.2)


def _try(call, expression: str):
    """evaluate(), or None while the page swaps documents (its execution context is gone for a moment)."""
    try:
        return evaluate(call, expression)
    except RuntimeError:
        return None


def page_text(call) -> str:
    """What the page shows as text: document.body.innerText (visible elements only, as laid out)."""
    return evaluate(call, TEXT_JS) or ""


def squash(text: str) -> str:
    """Runs of whitespace (table cells come out as tabs and newlines) as one space."""
    return " ".join(text.split())


def wait_for_text(call, needles: list[str], timeout_s: float = 60.0) -> str:
    """Polls the page's visible text until it contains every needle (whitespace squashed on both sides);
    returns that squashed text. Raises TimeoutError naming the missing needles and showing the page's text."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = squash(_try(call, TEXT_JS) or "")
        missing = [n for n in needles if squash(n) not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s the page still lacks {missing}; it shows:\n{text[:3000]}")
        time.sleep(0.5)


def click_text(call, text: str) -> int:
    """Clicks, with the mouse as a person does, the last visible element whose whole text is `text` (a tab,
    a button); returns how many matched (0: nothing clicked). Some tabs switch on mousedown, not on click()."""
    hit = evaluate(call, FIND_JS.format(text=json.dumps(text)))
    if hit is None:
        return 0
    x, y, n = hit
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left" if kind != "mouseMoved" else "none",
             clickCount=1 if kind != "mouseMoved" else 0)
    return n


def click_until(call, text: str, needles: list[str], timeout_s: float = 60.0, retry_s: float = 5.0) -> str:
    """Clicks `text` (a tab) until the page shows every needle; returns the page's squashed text. The app
    re-lays its tabs out while it loads (the flow run's page adds Task Runs / Artifacts once the run's state
    arrives), so a click made just before that can land on the wrong tab or between tabs: if the needles are
    not there `retry_s` after a click, it clicks again. Raises TimeoutError as wait_for_text does."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not click_text(call, text) and time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s nothing on the page reads {text!r}")
        try:
            return wait_for_text(call, needles, min(retry_s, max(deadline - time.monotonic(), 0.5)))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def page_images(call) -> list[dict]:
    """Every <img> on the page: src (first 40 characters), alt, complete, naturalWidth/Height (the decoded
    image; 0 when it failed to load) and x, y, width, height (its box in the viewport, CSS px)."""
    return evaluate(call, IMAGES_JS)


def wait_for_images(call, count: int, timeout_s: float = 30.0) -> list[dict]:
    """Polls until the page has at least `count` <img> elements and all have finished loading (or failed);
    returns them, as many as there are once timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        imgs = page_images(call)
        if len(imgs) >= count and all(i["complete"] for i in imgs) or time.monotonic() > deadline:
            return imgs
        time.sleep(0.5)


def loaded(img: dict) -> bool:
    """The browser decoded the image (a broken data: URI or a blocked src leaves naturalWidth 0)."""
    return img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0


def capture(call, path: str) -> str:
    """Saves a PNG of the viewport to `path`; returns it."""
    with open(path, "wb") as f:
        f.write(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
    return path


def screenshot(url: str, out: str, click: str | None = None, wait_s: float = 8.0, size=(1600, 1100),
               expect: list[str] | None = None) -> int:
    """Saves a PNG of `url` to `out`; returns how many elements matched `click` (0 without one).
    With `expect`, waits (up to wait_s x 4) until the page shows those texts instead of a fixed wait_s."""
    with chromium(size) as call:
        goto(call, url)
        if expect and not click:
            wait_for_text(call, expect, wait_s * 4)
        else:
            time.sleep(wait_s)
        hits = 0
        if click:
            if expect:
                click_until(call, click, expect, wait_s * 4)
                hits = 1
            else:
                hits = click_text(call, click)
                time.sleep(wait_s / 2)
        capture(call, out)
        return hits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--click", help="whole visible text of a tab or button to click first, e.g. Artifacts")
    p.add_argument("--wait", type=float, default=8.0, help="seconds to let the page load (default 8)")
    p.add_argument("--expect", action="append", help="text the page must show before the screenshot (repeatable)")
    a = p.parse_args()
    if browser_path() is None:
        print(MISSING, file=sys.stderr)
        return 2
    hits = screenshot(a.url, a.out, a.click, a.wait, expect=a.expect)
    if a.click and not hits:
        print(f"nothing on the page reads {a.click!r}; saved the page as it is", file=sys.stderr)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
