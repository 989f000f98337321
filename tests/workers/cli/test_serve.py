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
    keywords = options["http"].keywords
    assert keywords["max_header_bytes"] == 16 * 1024
    # the slow-client bounds (docs/security.md, "Slow clients") at their defaults
    assert keywords["header_timeout"] == 10
    assert keywords["body_window"] == 30
    assert keywords["min_body_rate"] == 1024
    expected_cap = service.api.server.per_client_cap(256)
    assert keywords["max_connections_per_client"] == expected_cap
    assert 0 < expected_cap <= 256
