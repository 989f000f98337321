"""`tightrope serve` starts the gateway through service.server, which enforces the header-size
limit (docs/security.md); a plain uvicorn.run would drop it."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import service.server
from workers.cli import app


def test_serve_uses_the_header_limited_server(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(service.server, "run", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(app, ["serve", "--host", "127.0.0.1", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert calls == [{"host": "127.0.0.1", "port": 8123}]
    options = service.server.uvicorn_options()
    assert options["http"] is service.server.HeaderLimitedH11Protocol
