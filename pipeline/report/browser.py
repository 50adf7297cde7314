"""Open a page in headless Chromium over the DevTools protocol: errors, requests, screenshot.

Used by the tests (the report must open without console errors, broken images or network
requests) and by benchmarks/stats_report.py for the README screenshot. Chromium comes from
the system (Debian ``chromium``); nothing here downloads a browser. Needs ``websocket-client``.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    url: str
    errors: list[str] = field(default_factory=list)  # JS exceptions, console.error, browser log errors
    requests: list[str] = field(default_factory=list)  # every non-data: URL the page asked for
    n_images: int = 0
    broken_images: int = 0  # <img> that did not decode (bad data: URI)
    title: str = ""
    png: bytes = b""


class _Cdp:
    """A minimal synchronous DevTools client: send a command, collect events until its reply."""

    def __init__(self, ws_url: str):
        import websocket

        # suppress_origin: Chromium refuses DevTools websockets with a foreign Origin header.
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        for i, ev in enumerate(self.events):
            if ev["method"] == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"no {method} within {timeout_s} s")

    def close(self):
        self.ws.close()


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout_s: float) -> int:
    """--remote-debugging-port=0 picks a free port and writes it to DevToolsActivePort."""
    f = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        if f.exists():
            lines = f.read_text().split("\n")
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
        time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


def _errors(events: list[dict]) -> list[str]:
    out = []
    for ev in events:
        m, p = ev["method"], ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log ({p['entry'].get('source')}): {p['entry']['text']}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')}")
    return out


def check_pages(paths: list[str | Path], *, width: int = 1280, height: int = 1000, timeout_s: float = 30,
                full_page: bool = False, chromium: str | None = None) -> list[PageCheck]:
    """Load each page (file path or URL) in one headless Chromium; a screenshot of each viewport
    (or of the whole page with ``full_page``)."""
    exe = chromium or find_chromium()
    if not exe:
        raise FileNotFoundError("chromium is not installed")
    results = []
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = _devtools_port(Path(profile), proc, timeout_s)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout_s) as r:
                targets = [t for t in json.load(r) if t["type"] == "page"]
            cdp = _Cdp(targets[0]["webSocketDebuggerUrl"])
            try:
                for domain in ("Runtime", "Log", "Page", "Network"):
                    cdp.call(f"{domain}.enable")
                cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                         mobile=False)
                for path in paths:
                    url = path if "://" in str(path) else Path(path).resolve().as_uri()
                    cdp.events.clear()
                    cdp.call("Page.navigate", url=url)
                    cdp.wait_event("Page.loadEventFired", timeout_s)
                    info = cdp.call("Runtime.evaluate", returnByValue=True, expression=(
                        "({title: document.title, n: document.images.length, broken: Array.from(document.images)"
                        ".filter(i => !(i.complete && i.naturalWidth > 0)).length})"))["result"]["value"]
                    shot_args = {"format": "png"}
                    if full_page:
                        size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
                        shot_args.update(captureBeyondViewport=True, clip={
                            "x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1})
                    shot = cdp.call("Page.captureScreenshot", **shot_args)
                    cdp.call("Runtime.evaluate", expression="0")  # drain events emitted while loading
                    res = PageCheck(url=url, errors=_errors(cdp.events), n_images=info["n"],
                                    broken_images=info["broken"], title=info["title"],
                                    png=base64.b64decode(shot["data"]))
                    res.requests = [ev["params"]["request"]["url"] for ev in cdp.events
                                    if ev["method"] == "Network.requestWillBeSent"
                                    and not ev["params"]["request"]["url"].startswith("data:")]
                    results.append(res)
                try:
                    cdp.call("Browser.close")
                except Exception:  # noqa: BLE001 - the socket may close before the reply
                    pass
            finally:
                cdp.close()
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return results
