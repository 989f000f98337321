"""A real headless Chromium driven over the Chrome DevTools Protocol, for the HTML report test
and the web console's test.

`visit` opens a file, waits for its load event, and returns the console errors, uncaught
exceptions and log entries of level error it produced, plus the result of a JavaScript
expression. `Browser` keeps one Chromium open over several pages of a running service.
"""

from __future__ import annotations

import base64
import contextlib
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


class Browser:
    """A headless Chromium kept open over several pages (the console's browser test): navigate,
    run JavaScript, press keys, take screenshots. Records every console error, uncaught
    exception and error log entry (`errors`), the URL of every request the page or its frames
    make (`requests`) and the status of every response (`responses`).

    `with Browser(profile) as browser: browser.navigate(url); browser.evaluate("...")`
    """

    def __init__(self, profile: Path, timeout: float = 60.0) -> None:
        self.profile = profile
        self.timeout = timeout
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.responses: list[tuple[str, int]] = []
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}
        self._loads = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Browser:
        binary = chromium_binary()
        assert binary is not None, "chromium is not installed (apt-get install chromium)"
        self._process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = _devtools_port(self.profile, self._process, self.timeout)
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
            self._ws = self._stack.enter_context(
                connect(url, max_size=None, open_timeout=self.timeout)
            )
            for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
                self.call(method)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _pump(self, until: Any) -> None:
        deadline = time.monotonic() + self.timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from chromium")
            message = json.loads(self._ws.recv(timeout=remaining))
            if "id" in message:
                self._answers[message["id"]] = message
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Page.loadEventFired":
                self._loads += 1
            elif method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif method == "Network.responseReceived":
                self.responses.append((params["response"]["url"], params["response"]["status"]))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append(
                    "console: " + " ".join(str(a.get("value", "")) for a in params.get("args", []))
                )
            elif method == "Runtime.exceptionThrown":
                self.errors.append("exception: " + json.dumps(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append("log: " + params["entry"].get("text", ""))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and wait for its answer (its `result`)."""
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        self._pump(lambda: message_id in self._answers)
        answer = self._answers.pop(message_id)
        assert "error" not in answer, answer
        result: dict[str, Any] = answer.get("result", {})
        return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result.get("result", {}).get("value")

    def _loaded_after(self, action: Any) -> None:
        loads = self._loads
        action()
        self._pump(lambda: self._loads > loads)
        self.settle()

    def navigate(self, url: str) -> None:
        self._loaded_after(lambda: self.call("Page.navigate", url=url))

    def submit(self, expression: str) -> None:
        """Run `expression` (a click, a form submit) and wait for the page it loads."""
        self._loaded_after(lambda: self.evaluate(expression))

    def settle(self, seconds: float = 0.2) -> None:
        """Let late events (a blocked resource, a console message) arrive."""
        time.sleep(seconds)
        self.call("Runtime.evaluate", expression="1")

    def wait_for(self, expression: str, seconds: float = 15.0) -> Any:
        """Evaluate `expression` until it is truthy; its value."""
        deadline = time.monotonic() + seconds
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.2)

    def press(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=code,
                windowsVirtualKeyCode=key_code,
            )

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )

    def screenshot(self) -> bytes:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return base64.b64decode(data)
