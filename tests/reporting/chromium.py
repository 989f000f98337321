"""A real headless Chromium driven over the Chrome DevTools Protocol, for the HTML report test.

Opens a file, waits for its load event, and returns the console errors, uncaught exceptions and
log entries of level error it produced, plus the result of a JavaScript expression.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageVisit:
    errors: list[str] = field(default_factory=list)
    value: Any = None


def _devtools_port(profile: Path, process: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}")
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def visit(page: Path, expression: str, profile: Path, timeout: float = 60.0) -> PageVisit:
    """Load `page` in a fresh headless Chromium, evaluate `expression` once it has loaded."""
    binary = chromium_binary()
    assert binary is not None, "chromium is not installed (apt-get install chromium)"
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = _devtools_port(profile, process, timeout)
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        socket_url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        with connect(socket_url, max_size=None, open_timeout=timeout) as ws:
            return _drive(ws, page, expression, timeout)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _drive(ws: Any, page: Path, expression: str, timeout: float) -> PageVisit:
    ids = itertools.count(1)
    result = PageVisit()
    answers: dict[int, dict[str, Any]] = {}
    loaded = False

    def send(method: str, **params: Any) -> int:
        message_id = next(ids)
        ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        return message_id

    def pump(until: Any) -> None:
        nonlocal loaded
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from chromium")
            message = json.loads(ws.recv(timeout=remaining))
            if "id" in message:
                answers[message["id"]] = message
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Page.loadEventFired":
                loaded = True
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.errors.append(
                    "console: " + " ".join(str(a.get("value", "")) for a in params.get("args", []))
                )
            elif method == "Runtime.exceptionThrown":
                result.errors.append("exception: " + json.dumps(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                result.errors.append("log: " + params["entry"].get("text", ""))

    for method in ("Page.enable", "Runtime.enable", "Log.enable"):
        sent = send(method)
        pump(lambda sent=sent: sent in answers)
    send("Page.navigate", url=page.resolve().as_uri())
    pump(lambda: loaded)
    evaluation = send("Runtime.evaluate", expression=expression, returnByValue=True)
    pump(lambda: evaluation in answers)
    time.sleep(0.2)  # late console messages (e.g. a blocked resource) arrive just after load
    flush = send("Runtime.evaluate", expression="1")
    pump(lambda: flush in answers)
    result.value = answers[evaluation].get("result", {}).get("result", {}).get("value")
    return result
