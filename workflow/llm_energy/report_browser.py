"""Open a Snakemake HTML report in a real headless Chromium and check what a reader sees.

Chromium is driven through its DevTools protocol (a websocket; the `websockets` client): the report
is loaded from a file with networking off, its figure categories and pages are opened by clicking
them as a reader would, and the check reports every script error (uncaught exceptions, console
errors), whether each opened figure decoded (naturalWidth > 0), whether the summary page's table has
rows, and saves screenshots.

    python -m llm_energy.report_browser report.html --screenshot shot.png [--table-screenshot t.png]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Flags for a headless, sandbox-free (root in CI), offline browser that phones nobody.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)
WINDOW = (1400, 1000)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class ReportCheck:
    """What the browser saw."""

    errors: list[str] = field(default_factory=list)  # script errors (exceptions, console errors)
    categories: list[str] = field(default_factory=list)  # result categories in the report's menu
    figures_opened: list[dict[str, Any]] = field(default_factory=list)  # {name, width, height}
    summary_rows: int = 0  # rows of the summary page's main table
    summary_units: int = 0  # unit labels in its header
    captions: int = 0  # results with a caption of some length
    screenshots: list[str] = field(default_factory=list)


class DevTools:
    """A minimal DevTools-protocol session with one page."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self._connection = connect(url, max_size=64 * 1024 * 1024, open_timeout=30)
        self.socket = self._connection.__enter__()
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def pump(self, seconds: float) -> None:
        """Collect events for a while."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = json.loads(self.socket.recv(timeout=left))
            except TimeoutError:
                return
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, context_id: int | None = None) -> Any:
        params: dict[str, Any] = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.call("Runtime.evaluate", **params)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate {expression[:80]!r}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, context_id: int | None = None) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression, context_id)
            if value:
                return value
            self.pump(0.2)
        raise TimeoutError(f"waited {timeout_s} s for {expression[:120]!r}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


def _script_errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(
                "exception: " + str((details.get("exception") or {}).get("description") or details.get("text"))
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(
                "console.error: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append("log: " + str(params["entry"].get("text")))
    return errors


CLICK_TEXT = """(() => {{
  const wanted = {text};
  const links = [...document.querySelectorAll('a')].filter(a => a.innerText.trim() === wanted);
  if (!links.length) return false;
  links[0].click();
  return true;
}})()"""
# Open the first result of the shown category whose label contains `label` (its view button is the
# first link of its row).
OPEN_RESULT = """(() => {{
  const wanted = {label}.toLowerCase();
  const rows = [...document.querySelectorAll('tr')].filter(r => r.innerText.toLowerCase().includes(wanted) &&
                                                                r.querySelector('a'));
  if (!rows.length) return false;
  rows[0].querySelector('a').click();
  return true;
}})()"""
# The figure shown in the content area: an image that is one of the report's results (not its logo).
IMAGE_SHOWN = """(() => {
  const uris = new Set(Object.values(results).map(r => r.data_uri));
  const img = [...document.querySelectorAll('img')].find(i => uris.has(i.src));
  return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;
})()"""


def _launch(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before DevTools listened")
        match = re.search(r"DevTools listening on (ws://[^\s]+)", line)
        if match:
            port = re.search(r":(\d+)/", match.group(1)).group(1)  # type: ignore[union-attr]
            return process, port
    process.kill()
    raise RuntimeError("chromium did not start its DevTools endpoint within 60 s")


def check_report(
    report: Path | str,
    screenshot: Path | str,
    table_screenshot: Path | str | None = None,
    figure: str = "energy_vs_batch_size",
    timeout_s: float = 60.0,
    log: Callable[[str], None] = lambda _line: None,
) -> ReportCheck:
    """Load `report` in headless Chromium, open the Figures category and `figure`, then the summary
    page; screenshot the figure view (and the table)."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install -y chromium)")
    report = Path(report).resolve()
    check = ReportCheck()
    with tempfile.TemporaryDirectory(prefix="llm-energy-chromium-") as profile:
        process, port = _launch(chromium, Path(profile))
        import threading

        # Chromium keeps writing to stderr; drain it so it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            tools = DevTools(pages[0]["webSocketDebuggerUrl"])
            for domain in ("Runtime", "Log", "Page"):
                tools.call(f"{domain}.enable")
            tools.call("Network.enable")
            tools.call(
                "Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1, uploadThroughput=-1
            )
            tools.call("Page.navigate", url=report.as_uri())
            tools.wait_for("document.readyState === 'complete'", timeout_s)
            tools.wait_for(
                "document.querySelector('#app') && document.querySelector('#app').innerText.length > 0", timeout_s
            )
            tools.wait_for(CLICK_TEXT.format(text=json.dumps("Results")) + " || true", timeout_s)
            tools.pump(0.5)
            check.categories = tools.evaluate("Object.keys(categories)") or []
            check.captions = tools.evaluate("Object.values(results).filter(r => (r.caption || '').length > 80).length")
            log(f"categories: {check.categories}")
            tools.wait_for(CLICK_TEXT.format(text=json.dumps("Figures")), timeout_s)
            tools.wait_for(OPEN_RESULT.format(label=json.dumps(figure)), timeout_s)
            size = tools.wait_for(IMAGE_SHOWN, timeout_s)
            check.figures_opened.append({"name": figure, "width": size[0], "height": size[1]})
            tools.pump(0.5)
            tools.screenshot(Path(screenshot))
            check.screenshots.append(str(screenshot))
            # The summary table: its page is an HTML result shown in an iframe of its own origin.
            contexts_before = len(tools.events)
            tools.wait_for(CLICK_TEXT.format(text=json.dumps("Results")) + " || true", timeout_s)
            tools.wait_for(CLICK_TEXT.format(text=json.dumps("Campaign")), timeout_s)
            tools.wait_for(OPEN_RESULT.format(label=json.dumps("summary")), timeout_s)
            tools.wait_for("document.querySelector('iframe') !== null", timeout_s)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not check.summary_rows:
                tools.pump(0.3)
                for event in tools.events[contexts_before:]:
                    if event["method"] != "Runtime.executionContextCreated":
                        continue
                    context = event["params"]["context"]["id"]
                    try:
                        counts = tools.evaluate(
                            "[document.querySelectorAll('#summary-table tbody tr').length, "
                            "document.querySelectorAll('#summary-table .unit').length]",
                            context,
                        )
                    except RuntimeError:
                        continue
                    if counts and counts[0]:
                        check.summary_rows, check.summary_units = counts
            if table_screenshot is not None:
                tools.screenshot(Path(table_screenshot))
                check.screenshots.append(str(table_screenshot))
            check.errors = _script_errors(tools.events)
            tools.close()
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, required=True)
    parser.add_argument("--table-screenshot", type=Path)
    parser.add_argument("--figure", default="energy_vs_batch_size")
    args = parser.parse_args(argv)
    check = check_report(args.report, args.screenshot, args.table_screenshot, args.figure, log=print)
    print(json.dumps(check.__dict__, indent=1))
    return 0 if not check.errors and check.figures_opened and check.summary_rows else 1


if __name__ == "__main__":
    sys.exit(main())
