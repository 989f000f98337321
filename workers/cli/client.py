"""A small HTTP client of the Tightrope API (`tightrope submit`, `gate` and `demo`), and the
whole remote audit they share (`run_remote_audit`).

Torch-free: it only moves files and JSON. It raises errors (ApiError, RemoteAuditFailed,
TimeoutError); the command line (workers.cli.main) turns them into exit codes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from schemas.audits import TERMINAL_STATES
from schemas.model_spec import ModelSpec
from workers.cli.progress import describe, progress_display

out = Console()
err = Console(stderr=True)


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


class RemoteAuditFailed(Exception):
    """The remote audit ended without a report: the model was rejected, or the audit failed or
    was cancelled. `code` is the exit code the command line gives it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


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

    def register_endpoint(self, registration: dict[str, Any]) -> dict[str, Any]:
        """Register a model by its inference endpoint (POST /v1/endpoint-models)."""
        return self._json("POST", "/v1/endpoint-models", json=registration)

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
                why = f": {model['reason']}" if model.get("reason") else ""
                raise TimeoutError(f"model {model_id} still validating after {timeout:.0f} s{why}")
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
        # a deployment may send the report on to a presigned URL of its bucket (307, another
        # host: httpx does not carry the API key there)
        return self._json("GET", f"/v1/audits/{audit_id}/report", follow_redirects=True)

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


def run_remote_audit(
    client: TightropeClient,
    model: Path,
    spec: dict[str, Any],
    config: dict[str, Any],
    out_dir: Path,
    quiet: bool = False,
    *,
    reuse_model: bool = False,
    junit: bool = False,
    rejected_code: int = 1,
    compare_with: str | None = None,
) -> str:
    """Upload (or reuse a ready model with the same file and spec), wait for admission,
    submit, poll with progress, and save report.json and report.html (and junit.xml when
    asked); the verdict. Raises RemoteAuditFailed (with the exit code the CLI gives it) when
    the model is rejected or the audit does not succeed. `compare_with`: a model file (uploaded
    or reused like the model, with its spec) or the id of a model on the service."""
    model_id = _ready_model(client, model, spec, reuse_model, rejected_code)
    request = dict(config, model_id=model_id)
    if compare_with is not None:
        reference = Path(compare_with)
        reference_id = (
            _ready_model(client, reference, spec, True, rejected_code)
            if reference.is_file()
            else compare_with
        )
        request["compare_with"] = {"model_id": reference_id}
    status = client.submit_audit(request)
    err.print(f"audit {status['id']} submitted")
    with progress_display(err, quiet=quiet) as bar:
        final = client.wait_audit(
            status["id"],
            on_progress=lambda s: bar.update(s["progress"]["fraction"], describe(s)),
        )
    if final["status"] != "succeeded":
        problem = final.get("error") or {}
        raise RemoteAuditFailed(f"audit {final['status']}: {problem.get('detail', '')}", 2)
    report = client.get_report(final["id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    html = client.get_report_file(final["id"], "report.html")
    if html is not None:
        (out_dir / "report.html").write_bytes(html)
    if junit:
        junit_xml = client.get_report_file(final["id"], "report.junit.xml")
        if junit_xml is not None:
            (out_dir / "junit.xml").write_bytes(junit_xml)
    out.print(f"verdict: [bold]{report['verdict']}[/bold]")
    out.print(f"report: {report_path.resolve()}", highlight=False, soft_wrap=True)
    return str(report["verdict"])


def _ready_model(
    client: TightropeClient, model: Path, spec: dict[str, Any], reuse: bool, rejected_code: int
) -> str:
    """The id of the model file on the service: reused when allowed, else uploaded and admitted."""
    model_id = _reusable_model(client, model, spec) if reuse else None
    if model_id is not None:
        err.print(f"model {model_id} already uploaded (same sha256 and spec), reusing it")
        return model_id
    uploaded = client.upload_model(model, spec)
    err.print(f"model {uploaded['id']} uploaded ({uploaded['format']}), validating…")
    admitted = client.wait_model(uploaded["id"])
    if admitted["status"] != "ready":
        raise RemoteAuditFailed(f"model rejected: {admitted.get('reason')}", rejected_code)
    return str(admitted["id"])


def _reusable_model(client: TightropeClient, model: Path, spec: dict[str, Any]) -> str | None:
    """A ready model of this tenant with the same file and the same spec (a different spec
    audits differently, so it does not count), or None."""
    wanted = ModelSpec.model_validate(spec).model_dump(mode="json")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    for candidate in client.find_models(sha):
        if candidate["status"] == "ready" and candidate["spec"] == wanted:
            return str(candidate["id"])
    return None
