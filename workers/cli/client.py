"""A small HTTP client of the Tightrope API (`tightrope submit`, `gate` and `demo`).

Torch-free: it only moves files and JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from schemas.audits import TERMINAL_STATES


class ApiError(Exception):
    """A problem answered by the service (RFC 9457), or a transport failure."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        title, detail = body.get("title", response.reason_phrase), body.get("detail", "")
    except ValueError:
        title, detail = response.reason_phrase, response.text[:500]
    raise ApiError(response.status_code, title, detail)


ProgressCallback = Callable[[dict[str, Any]], None]


class TightropeClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TightropeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._http.request(method, url, **kwargs)
        _raise_for_problem(response)
        return response.json()

    def upload_model(self, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
        with open(path, "rb") as f:
            files = {"file": (path.name, f, "application/octet-stream")}
            return self._json("POST", "/v1/models", files=files, data={"spec": json.dumps(spec)})

    def upload_dataset(self, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
        with open(path, "rb") as f:
            files = {"file": (path.name, f, "application/octet-stream")}
            return self._json("POST", "/v1/datasets", files=files, data={"spec": json.dumps(spec)})

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{model_id}")

    def wait_model(
        self, model_id: str, timeout: float = 600.0, poll: float = 0.5
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            model = self.get_model(model_id)
            if model["status"] != "validating":
                return model
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model_id} still validating after {timeout:.0f} s")
            time.sleep(poll)

    def submit_audit(
        self, request: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/audits", json=request, headers=headers)

    def get_audit(self, audit_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/audits/{audit_id}")

    def wait_audit(
        self,
        audit_id: str,
        on_progress: ProgressCallback | None = None,
        timeout: float = 24 * 3600.0,
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Poll with ETags until the audit reaches a terminal state."""
        deadline = time.monotonic() + timeout
        etag: str | None = None
        status: dict[str, Any] | None = None
        while True:
            headers = {"If-None-Match": etag} if etag else {}
            response = self._http.get(f"/v1/audits/{audit_id}", headers=headers)
            if response.status_code != 304:
                _raise_for_problem(response)
                status = response.json()
                etag = response.headers.get("ETag")
                if on_progress is not None:
                    on_progress(status)
            assert status is not None
            if status["status"] in TERMINAL_STATES:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"audit {audit_id} not finished after {timeout:.0f} s")
            time.sleep(poll)

    def get_report(self, audit_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/audits/{audit_id}/report")

    def get_report_file(self, audit_id: str, name: str) -> bytes | None:
        """`report.html` or `report.junit.xml` of a succeeded audit; None when not there."""
        response = self._http.get(f"/v1/audits/{audit_id}/{name}")
        if response.status_code == 404:
            return None
        _raise_for_problem(response)
        return response.content

    def find_models(self, sha256: str) -> list[dict[str, Any]]:
        """The tenant's live models whose file has this sha256, newest first."""
        return list(self._json("GET", "/v1/models", params={"sha256": sha256})["items"])
