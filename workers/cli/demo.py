"""`tightrope demo`: the whole service once, end to end, on embedded defaults."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from workers.cli.stack import LocalStack

# The reference model of the case study (docs/case-study.md), with a short audit.
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "reference"

console = Console(stderr=True)


def _create_key(stack: LocalStack) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "keys", "create", "--tenant", "demo"],
        env=stack.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the stack's processes, which run
    # in sessions of their own, are stopped by the `finally` below instead of left running.
    raise SystemExit(128 + signum)


def run_demo(out_dir: Path) -> int:
    from workers.cli.client import ApiError, RemoteAuditFailed, TightropeClient, run_remote_audit

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    data_dir = Path(".tightrope") / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    # The demo's model is .safetensors, which runs without bubblewrap: a machine without it
    # is ready for the demo (docs/security.md, "Without bubblewrap").
    stack = LocalStack(
        data_dir=data_dir.resolve(), extra_env={"TIGHTROPE_READY_WITHOUT_SANDBOX": "1"}
    )
    console.print("starting the broker, the gateway and a worker…")
    try:
        stack.start()
        console.print(f"service ready at {stack.api_url} (broker {stack.broker_url})")
        key = _create_key(stack)
        spec = json.loads((EXAMPLE_DIR / "spec.json").read_text())
        config = json.loads((EXAMPLE_DIR / "audit.json").read_text())
        with TightropeClient(stack.api_url, key) as client:
            verdict = run_remote_audit(
                client, EXAMPLE_DIR / "model.safetensors", spec, config, out_dir
            )
        console.print(f"logs: {stack.log_dir}")
        return 0 if verdict in ("pass", "fail", "info") else 1
    except RemoteAuditFailed as exc:
        console.print(f"[red]demo failed:[/red] {exc}; logs in {stack.log_dir}")
        return exc.code
    except (ApiError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}; logs in {stack.log_dir}")
        return 1
    finally:
        stack.stop()
