"""The gateway never imports torch (it must not load or run uploaded models)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_app_leaves_torch_out() -> None:
    code = (
        "import sys, service.api.app, service.api.audit_routes, service.api.inspect_upload;"
        "service.api.app.create_app();"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
