"""`tightrope serve` starts the gateway through service.api.server, which enforces the header-size
limit (docs/security.md); a plain uvicorn.run would drop it."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import service.api.server
from workers.cli.main import app


def test_serve_uses_the_header_limited_server(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(service.api.server, "run", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(app, ["serve", "--host", "127.0.0.1", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert calls == [{"host": "127.0.0.1", "port": 8123}]
    options = service.api.server.uvicorn_options()
    assert options["http"].func is service.api.server.HeaderLimitedHttpToolsProtocol
    assert options["http"].keywords == {"max_header_bytes": 16 * 1024}
