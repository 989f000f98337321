"""Dockerfile and docker-compose.yml, checked by what runs without a Docker engine: the official
compose binary's offline `config`, hadolint, and the entry points the files name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (it comes with the dev extras)")
    return path


def _compose() -> dict:
    result = subprocess.run(
        [
            _tool("docker-compose"),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_compose_file_is_valid_and_complete() -> None:
    config = _compose()
    services = config["services"]
    assert set(services) >= {"api", "worker", "redis", "postgres"}
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    for name in ("api", "worker", "redis", "postgres"):
        assert "healthcheck" in services[name], name
    for name in ("api", "worker"):
        assert any(v["target"] == "/data" for v in services[name]["volumes"]), name
        env = services[name]["environment"]
        assert env["TIGHTROPE_BROKER_URL"].startswith("redis://")
        assert env["TIGHTROPE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["worker"]["restart"] == "unless-stopped"


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_bubblewrap_and_variants() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "bubblewrap" in text
    assert "ARG VARIANT=" in text
    user_lines = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1].split()[1] not in ("root", "0")
    for copied in ("schemas", "service", "workers", "alembic"):
        assert (ROOT / copied).exists(), f"the Dockerfile copies {copied}/, which is missing"


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_commands_exist(service: str) -> None:
    """Every command compose runs is a real `tightrope` sub-command."""
    commands = [_compose()["services"][service]["command"]]
    healthcheck = _compose()["services"][service]["healthcheck"]["test"]
    if healthcheck[1] == "tightrope":
        commands.append(healthcheck[1:])
    for argv in commands:
        assert argv[0] == "tightrope"
        result = subprocess.run(
            [sys.executable, "-m", "workers.cli", argv[1], "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
