"""What the README tells a user to type, run as written: the curl walkthrough (`make demo`:
test_make_demo.py, which shares these helpers).

The commands are read out of the Makefile and README.md themselves, so a change that breaks
them (or lets the README drift from the product) fails here. The only changes made to them:
the gateway's port 8000 becomes a free port, and the walkthrough's broker is the suite's own
Redis database (an environment variable, not a command).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import REDIS_URL, wait_until
from workers.cli.stack import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def makefile_recipe(target: str) -> list[str]:
    """The recipe lines of a Makefile target, as make would run them."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{target}:")))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def readme_section_blocks(heading: str) -> list[str]:
    """The bash blocks of one `## heading` section of README.md, up to its first `###` part
    (the parts after it show commands on the reader's own files: model.pt, released.pt)."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert blocks, f"README section {heading!r} has no bash block"
    return blocks


def readme_section_code(heading: str) -> str:
    """The bash blocks of one `## heading` section of README.md, joined."""
    return "\n".join(readme_section_blocks(heading))


def workdir(tmp_path: Path) -> Path:
    """A directory that looks like the repository root to the commands (the venv and the
    examples they name), so what they write lands here and not in the checkout."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV_BIN.parent)
    (work / "examples").symlink_to(REPO / "examples")
    return work


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTROPE_")}
    env.update(extra)
    return env


def run_until_done(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[int, str]:
    """Run a command; past `timeout` send it SIGTERM (the demo then stops its whole stack)."""
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"{argv} still running after {timeout:.0f} s:\n{output[-4000:]}")
    return proc.returncode, output


def _service_commands(port: int) -> list[list[str]]:
    """`tightrope serve` and `tightrope worker` of the README's "Running the service"."""
    commands = []
    for line in readme_section_code("Running the service").splitlines():
        command = line.split("#", 1)[0].strip()
        if re.match(r"\.venv/bin/tightrope (serve|worker)\b", command):
            commands.append(command.replace("8000", str(port)).split())
    assert [c[1] for c in commands] == ["serve", "worker"], commands
    return commands


@pytest.fixture
def readme_service(tmp_path: Path, redis_client: object) -> Iterator[tuple[Path, int]]:
    work = workdir(tmp_path)
    port = free_port()
    env = clean_env(TIGHTROPE_BROKER_URL=REDIS_URL)
    processes = []
    logs = []
    for argv in _service_commands(port):
        log = open(tmp_path / f"{argv[1]}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        processes.append(
            subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 180, "the README's gateway and worker ready", poll=0.5)
        yield work, port
    finally:
        for proc in processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in logs:
            log.close()
        for name in ("serve", "worker"):
            path = tmp_path / f"{name}.log"
            if path.exists():
                print(f"===== {name}.log =====\n{path.read_text(errors='replace')[-5000:]}")


@pytest.mark.timeout(900)
def test_the_readme_walkthrough_runs_as_written(readme_service: tuple[Path, int]) -> None:
    work, port = readme_service
    blocks = readme_section_blocks("Using it")
    assert "API=http://127.0.0.1:8000" in blocks[0]
    # every block as written, on this test's port; but the ONNX one, whose model.onnx the prose
    # tells the reader how to export (the ONNX corpus tests cover that path)
    script = "\n".join(block for block in blocks if "model.onnx" not in block)
    assert "tightrope submit" in script and "tightrope verify" in script
    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    # every command runs, as a reader pasting the blocks would; each failure is named. The one
    # allowed: `tightrope submit` exits 1 when the verdict is fail (the reference audit's is)
    trap = "trap 'echo \"FAILED $? :: $BASH_COMMAND\" >&2' ERR\n"
    done = subprocess.run(
        ["bash", "-uo", "pipefail", "-c", trap + script],
        cwd=work,
        env=clean_env(TIGHTROPE_BROKER_URL=REDIS_URL),
        capture_output=True,
        text=True,
        timeout=780,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    failures = [line for line in done.stderr.splitlines() if line.startswith("FAILED ")]
    allowed = [f for f in failures if f.startswith("FAILED 1 :: .venv/bin/tightrope submit ")]
    assert failures == allowed, output
    assert "ready" in done.stdout
    # `tightrope verify` of the report `tightrope submit` saved, with the service's key
    assert (work / "tightrope.pem").stat().st_size > 0
    submitted = json.loads((work / "out" / "report.json").read_text())
    assert submitted["verdict"] == ("fail" if allowed else submitted["verdict"]), allowed
    assert submitted["verdict"] in ("pass", "fail", "info")
    report = json.loads((work / "report.json").read_text())
    assert report["verdict"] in ("pass", "fail", "info")
    assert "<html" in (work / "report.html").read_text().lower()
    suite = ET.parse(work / "junit.xml").getroot()
    assert list(suite.iter("testcase")), "junit.xml has no test case"
    # every artifact the report lists was fetched by the walkthrough's loop
    names = [a for check in report["checks"] for a in check["artifacts"]]
    assert names, "the walkthrough's worst_case check lists no artifact"
    for name in names:
        assert (work / "artifacts" / name).stat().st_size > 0, name
