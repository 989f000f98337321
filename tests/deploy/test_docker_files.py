"""Dockerfile and docker-compose.yml, checked by what runs without a Docker engine: the official
compose binary's offline `config`, hadolint, and the entry points the files name."""

from __future__ import annotations

import json
import os
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


def _compose(*profiles: str) -> dict:
    result = subprocess.run(
        [
            _tool("docker-compose"),
            "-f",
            str(ROOT / "docker-compose.yml"),
            *(arg for profile in profiles for arg in ("--profile", profile)),
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
            [sys.executable, "-m", "workers.cli.main", argv[1], "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr


def _gpu_devices(service: dict) -> list[dict]:
    return [
        d
        for d in service["deploy"]["resources"]["reservations"]["devices"]
        if "gpu" in d["capabilities"]
    ]


def test_the_worker_service_scales() -> None:
    """`docker compose up --scale worker=N` needs no fixed name and no published port."""
    worker = _compose()["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker["command"][:2] == ["tightrope", "worker"]
    assert "--gpus" in worker["command"]  # it reads the GPU queue, or cuda audits would wait


def test_the_multi_gpu_worker_is_off_by_default_and_takes_every_gpu() -> None:
    assert "worker-gpus" not in _compose()["services"]
    services = _compose("multi-gpu")["services"]
    multi = services["worker-gpus"]
    assert multi["profiles"] == ["multi-gpu"]
    assert [d["count"] for d in _gpu_devices(multi)] in ([-1], ["all"])
    assert multi["command"][:4] == ["tightrope", "worker", "--gpus", "all"]
    assert "container_name" not in multi and not multi.get("ports")
    for key in ("environment", "volumes", "security_opt", "healthcheck", "restart"):
        assert multi[key] == services["worker"][key], key


@pytest.mark.parametrize("service", ["worker", "worker-gpus"])
def test_worker_commands_parse_with_the_cli(service: str, tmp_path: Path) -> None:
    """The worker services' commands, dry-run on a machine whose (fake) nvidia-smi lists two
    GPUs: one worker per GPU, the CPU workers and the admission worker."""
    argv = _compose("multi-gpu")["services"][service]["command"]
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\nprintf "0\\n1\\n"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *argv[1:], "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    names = [line.split("@")[0] for line in result.stdout.splitlines()]
    cpu = ["cpu1", "cpu2"] if service == "worker-gpus" else ["cpu1"]
    assert names == ["gpu0", "gpu1", *cpu, "admission"]


def test_the_image_lets_the_nvidia_runtime_mount_nvidia_smi() -> None:
    """`tightrope worker --gpus all` asks nvidia-smi (the runtime's `utility` capability)."""
    text = (ROOT / "Dockerfile").read_text()
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
