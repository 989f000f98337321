"""Schemathesis against a real gateway (uvicorn over PostgreSQL, the production database): every
operation of the OpenAPI description, with valid and invalid requests, must answer without a
5xx, with a documented status, media type, headers and body schema; with every check of
schemathesis (an invalid request refused, a valid one accepted, authentication enforced, a
deleted model gone, a created one there, answers within MAX_RESPONSE_SECONDS...) save the
scoped exceptions `config` names with their reasons.

Deterministic (schemathesis' `deterministic` generation: the same requests on every run) and
bounded: the documented examples, the coverage phase's edge cases, then MAX_EXAMPLES fuzzed
requests per operation, then the stateful phase: STATEFUL_SCENARIOS chains of requests along the
description's links (service.api.app.RESOURCE_LINKS), created resources feeding the operations
on them; the run is killed, and the test failed, after RUN_SECONDS. In that phase half the
positive creates are real ones (schemathesis_hooks.py): generated files are never models or
arrays, so the links would otherwise lead nowhere. Seeded rows
make the routes answer more than 404s: a ready model with the id of the documented
`POST /v1/audits` examples (so they submit real audits), a succeeded audit with its report files
and artifacts, a queued audit, a dataset; path ids and the audit's `model_id` are drawn from them
half the time. The gateway resolves no host name (a `callback_url` host is refused at once, as
with no DNS): lookups would make the run slow and depend on the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.canonical import canonical_json
from service.api.app import create_app
from service.api.audit_routes import AUDIT_REQUEST_EXAMPLES
from service.db.keys import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import make_engine
from service.db.tables import Artifact, Audit, Dataset, Model, Tenant, WorkerHeartbeat
from service.domain.pagination import encode_token
from tests.fixtures.databases import postgres_database
from tests.fixtures.redis_dbs import redis_url
from tests.service.api.test_audit_routes import audit_request
from tests.service.api.test_uvicorn_smoke import free_port, wait_until_serving
from tests.service.conftest import SPEC, make_settings
from tests.service.reports.sample import make_report

SCHEMATHESIS_REDIS = redis_url(11)  # this file's own database on the shared Redis
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
MAX_EXAMPLES = 10
AUDIT_EXAMPLES = 100  # fuzzed audit requests (POST /v1/audits skips the coverage phase)
STATEFUL_SCENARIOS = 50
STATEFUL_STEPS = 6  # requests per scenario at most
MAX_RESPONSE_SECONDS = 10  # generous: a busy CI machine; catches a hang (a DNS lookup, a lock)
RUN_SECONDS = 90  # both runs together
DRAWN_FROM_SEEDS = 0.5  # how often a path id (or the audit's model_id) is a seeded row's
EXAMPLE_MODEL_ID = AUDIT_REQUEST_EXAMPLES["reconstruction"]["value"]["model_id"]

# uvicorn with the gateway's factory, in a process where only IP literals resolve.
OFFLINE_GATEWAY = """
import ipaddress, socket, sys
import uvicorn

real_getaddrinfo = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    try:
        ipaddress.ip_address(str(host).strip("[]").split("%", 1)[0])
    except ValueError:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return real_getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
uvicorn.run(
    "service.api.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
    access_log=False, log_level="warning",
)
"""


@dataclass(frozen=True)
class Seeded:
    secret: str
    model_id: str
    doomed_model_id: str  # the one DELETE may take (the other stays ready for audits)
    succeeded_audit_id: str
    queued_audit_id: str
    dataset_id: str
    artifacts: tuple[str, ...]
    page_token: str  # one the service issued (after the dataset): the list routes take no other


def seed(url: str, data_dir: Path) -> Seeded:
    """A tenant with a ready model, a succeeded audit (report files, two artifacts), a queued
    audit and a dataset, as the workers would have left them; and a live worker heartbeat."""
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            name = f"schemathesis-{uuid.uuid4().hex[:8]}"
            secret = create_api_key(session, name)
            tenant = session.scalar(select(Tenant).where(Tenant.name == name))
            assert tenant is not None
            models = [
                Model(
                    id=model_id,
                    tenant_id=tenant.id,
                    name=SPEC["name"],
                    spec=SPEC,
                    format="torchscript",
                    sha256=f"{n:064x}",
                    size_bytes=1,
                    status="ready",
                )
                for n, model_id in enumerate((EXAMPLE_MODEL_ID, f"mdl_{uuid.uuid4().hex}"))
            ]
            session.add_all(models)
            session.flush()
            audits = []
            for status in ("succeeded", "queued"):
                request = audit_request(models[0].id)
                audits.append(
                    Audit(
                        tenant_id=tenant.id,
                        model_id=models[0].id,
                        request=request,
                        request_hash=uuid.uuid4().hex,
                        status=status,
                        verdict="fail" if status == "succeeded" else None,
                    )
                )
            session.add_all(audits)
            dataset = Dataset(
                tenant_id=tenant.id,
                name="images",
                spec={"name": "images", "key": "images"},
                format="npz",
                sha256="3" * 64,
                size_bytes=1,
                shape={"images": [2, 1, 16, 16], "arrays": {"images": [2, 1, 16, 16]}},
            )
            session.add(dataset)
            session.add(WorkerHeartbeat(name="worker@test", hostname="test", pid=1))
            session.flush()
            succeeded = audits[0]
            folder = data_dir / "artifacts" / succeeded.id
            folder.mkdir(parents=True)
            (folder / "report.json").write_text(canonical_json(make_report()))
            (folder / "report.html").write_text("<!DOCTYPE html><title>report</title>")
            files = {
                "figure.png": ("image/png", b"\x89PNG fake"),
                "worst.npy": (None, b"\x93NUMPY"),
            }
            for name, (media_type, content) in files.items():
                (folder / name).write_bytes(content)
                session.add(
                    Artifact(
                        audit_id=succeeded.id,
                        name=name,
                        media_type=media_type or "application/octet-stream",
                        sha256="0" * 64,
                        size_bytes=len(content),
                        path=f"{succeeded.id}/{name}",
                    )
                )
            succeeded.report_path = f"{succeeded.id}/report.json"
            session.commit()
            return Seeded(
                secret=secret,
                model_id=models[0].id,
                doomed_model_id=models[1].id,
                succeeded_audit_id=succeeded.id,
                queued_audit_id=audits[1].id,
                dataset_id=dataset.id,
                artifacts=tuple(files),
                page_token=encode_token(dataset.created_at, dataset.id),
            )
    finally:
        engine.dispose()


def toml_value(value: Any) -> str:
    """TOML for the config's values: strings, numbers, booleans, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def operation(operation_id: str, **settings: Any) -> list[str]:
    """A `[[operations]]` table: settings for one operation."""
    table = ["[[operations]]", f"include-operation-id = {toml_value(operation_id)}"]
    return table + [f"{key} = {toml_value(value)}" for key, value in settings.items()]


# positive_data_acceptance (a schema-valid request is not refused) cannot hold where validity
# depends on more than JSON Schema can say; there it is off, for that operation only:
NOT_POSITIVE = {"checks": {"positive_data_acceptance": {"enabled": False}}}
# - the uploads: `file` must be a model (an array) this service reads; its bytes are beyond the
#   schema (`format: binary`), and generated bytes never are one;
UPLOADS = ("upload_model_v1_models_post", "upload_dataset_v1_datasets_post")
# - an audit: `model_id`, `dataset.dataset_id` (and compare_with's model) must name rows of the
#   tenant, the checks, operator and dataset must fit the model's task (a row's spec), and a
#   callback host must resolve to a public address (docs/http-api.md): 422s of a valid schema.
SUBMIT_AUDIT = "submit_audit_v1_audits_post"
# - an endpoint model: its spec's fields depend on its task (a classifier's `num_classes`), and
#   its URL's host must resolve to an address the deployment lets workers reach
#   (TIGHTROPE_ENDPOINT_ALLOW): 422s of a valid schema.
REGISTER_ENDPOINT = "register_endpoint_v1_endpoint_models_post"


def config(seeded: Seeded) -> str:
    """schemathesis.toml: what to check, how much to generate, and the seeded ids to draw."""

    def drawn(dictionary: str, probability: float = DRAWN_FROM_SEEDS) -> dict[str, Any]:
        return {"dictionary": dictionary, "probability": probability}

    dictionaries = {
        "models": [seeded.model_id],
        "doomed": [seeded.doomed_model_id],
        "audits": [seeded.succeeded_audit_id, seeded.queued_audit_id],
        "datasets": [seeded.dataset_id],
        "artifacts": list(seeded.artifacts),
        "page_tokens": ["", seeded.page_token],
    }
    lines = [
        "workers = 1",
        "request-timeout = 20",
        "[generation]",
        "deterministic = true",  # derandomized: the same requests on every run, a fixed seed
        f"max-examples = {MAX_EXAMPLES}",
        'mode = "all"',
        "[phases.stateful]",
        f"max-steps = {STATEFUL_STEPS}",
        f"generation = {toml_value({'max-examples': STATEFUL_SCENARIOS})}",
        # The description's links and those the creates' Location headers imply; not the links
        # schemathesis infers from field names, which would DELETE any listed model (the ready
        # model the audits need among them) and never start from POST /v1/audits.
        'inference = { algorithms = ["location-headers"] }',
        "[checks]",
        "enabled = true",  # every check; the exceptions are per operation, below
        f"max_response_time = {MAX_RESPONSE_SECONDS}",
    ]
    lines += [
        f"[dictionaries.{name}]\nvalues = {toml_value(values)}"
        for name, values in dictionaries.items()
    ]
    lines += [
        "[parameters]",
        f'"path.model_id" = {toml_value(drawn("models"))}',
        f'"path.audit_id" = {toml_value(drawn("audits"))}',
        f'"path.dataset_id" = {toml_value(drawn("datasets"))}',
        f'"path.name" = {toml_value(drawn("artifacts"))}',
        f'"body.model_id" = {toml_value(drawn("models"))}',
        # Opaque: a value the service did not issue is a 422 (no schema can tell them apart).
        f'"query.page_token" = {toml_value(drawn("page_tokens", 1.0))}',
        *operation(
            "delete_model_v1_models__model_id__delete",
            parameters={"path.model_id": drawn("doomed")},
        ),
        # The audit request's schema is large: the coverage phase's edge cases of every field
        # (some 2000 requests) would take most of the run. Its examples and more fuzzing instead.
        *operation(
            SUBMIT_AUDIT,
            phases={"coverage": {"enabled": False}},
            generation={"max-examples": AUDIT_EXAMPLES},
            **NOT_POSITIVE,
        ),
    ]
    for operation_id in (*UPLOADS, REGISTER_ENDPOINT):
        lines += operation(operation_id, **NOT_POSITIVE)
    return "\n".join(lines) + "\n"


@pytest.fixture
def schemathesis_broker() -> Iterator[None]:
    client = redis.Redis.from_url(SCHEMATHESIS_REDIS)
    client.flushdb()
    yield
    client.flushdb()


@contextmanager
def offline_gateway(data_dir: Path, url: str, log: Path) -> Iterator[str]:
    """The gateway under uvicorn (OFFLINE_GATEWAY) on a free port: its base URL."""
    env = {
        **os.environ,
        "TIGHTROPE_DATA_DIR": str(data_dir),
        "TIGHTROPE_DATABASE_URL": url,
        "TIGHTROPE_BROKER_URL": SCHEMATHESIS_REDIS,
        "TIGHTROPE_WORKER_STALE_SECONDS": "3600",  # the seeded heartbeat keeps /readyz ready
    }
    port = free_port()
    # Its log goes to a file (a pipe nobody reads would stall it once full): shown on failure.
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-c", OFFLINE_GATEWAY, str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def gateway(tmp_path: Path, schemathesis_broker: None) -> Iterator[tuple[str, Seeded]]:
    pytest.importorskip("schemathesis")  # a dev dependency: installed in CI
    with postgres_database("st") as url:
        upgrade_to_head(url)
        seeded = seed(url, tmp_path / "data")
        # Stopped before the database is dropped.
        with offline_gateway(tmp_path / "data", url, tmp_path / "gateway.log") as base:
            yield base, seeded


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    tmp_path: Path, gateway: tuple[str, Seeded]
) -> None:
    base, seeded = gateway
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(config(seeded))
    argv = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "run"]
    argv += [f"{base}/openapi.json", "--header", f"Authorization: Bearer {seeded.secret}"]
    events = tmp_path / "events.ndjson"
    argv += ["--no-color", "--report", "ndjson", "--report-ndjson-path", str(events)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=RUN_SECONDS, cwd=tmp_path, env=env
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout
        partial = out.decode(errors="replace") if isinstance(out, bytes) else out or ""
        pytest.fail(f"schemathesis ran past {RUN_SECONDS} s:\n{partial}")
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    # Exit status 1 on any failed check (a 5xx included), or on an error of the run itself.
    log = (tmp_path / "gateway.log").read_text(errors="replace")
    assert done.returncode == 0, (
        f"{output}\n--- gateway log (last 5000 characters) ---\n{log[-5000:]}"
    )
    operations = sum(
        len(methods) for methods in httpx.get(f"{base}/openapi.json").json()["paths"].values()
    )
    assert f"Tested: {operations}" in output, output
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated and generated[1] == generated[2], output
    # The seeded rows were reached: the gateway's own request counts, by route and status.
    answered = answers(httpx.get(f"{base}/metrics").text)
    audit = "/v1/audits/{audit_id}"
    for route in (
        audit,
        f"{audit}/report",
        f"{audit}/report.html",
        f"{audit}/report.junit.xml",
        f"{audit}/artifacts/{{name}}",
        "/v1/models/{model_id}",
        "/v1/datasets/{dataset_id}",
    ):
        assert answered[("GET", route, "200")] > 0, (route, answered)
    for route in (f"{audit}/report", f"{audit}/report.html", f"{audit}/report.junit.xml"):
        assert answered[("GET", route, "409")] > 0, (route, answered)  # the queued audit
    assert answered[("POST", "/v1/audits", "202")] > 0, answered
    # The stateful phase chained requests along the description's links from the creates. Which
    # links, and how often, varies a little between runs: schemathesis picks some with true
    # randomness (its stateful phase is not fully derandomized), so only that some were.
    followed = followed_links(events)
    creates = ("POST /v1/models -> [202] ", "POST /v1/datasets -> [201] ")
    assert sum(n for link, n in followed.items() if link.startswith(creates)) > 0, followed
    print(f"schemathesis: {elapsed:.1f} s, {generated[1]} requests, links followed: {followed}")


def followed_links(events: Path) -> Counter[str]:
    """`<source> -> [<status>] <link name>` → times the stateful phase followed it, from the
    run's NDJSON events."""
    followed: Counter[str] = Counter()
    for line in events.read_text().splitlines():
        finished = json.loads(line).get("ScenarioFinished")
        if not finished:
            continue
        for node in (finished.get("recorder") or {}).get("cases", {}).values():
            transition = node.get("transition") or {}
            if transition.get("id"):
                followed[transition["id"].rsplit(" -> ", 1)[0]] += 1
    return followed


def answers(exposition: str) -> Counter[tuple[str, str, str]]:
    """(method, route template, status) → requests answered, from GET /metrics."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "tightrope_http_requests_total":
                labels = sample.labels
                counts[(labels["method"], labels["route"], labels["status"])] += int(sample.value)
    return counts


def test_nul_bytes_are_not_a_server_error(tmp_path: Path, postgres_url: str) -> None:
    settings = make_settings(tmp_path, postgres_url, broker_url=SCHEMATHESIS_REDIS)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        engine = make_engine(postgres_url)
        with Session(engine) as session:
            auth = {"Authorization": f"Bearer {create_api_key(session, f'nul-{uuid.uuid4()}')}"}
        engine.dispose()
        images = BytesIO()
        np.save(images, np.zeros((2, 1, 8, 8), np.float32))
        answers = {
            "path": client.get("/v1/models/a%00b", headers=auth),
            "query": client.get("/v1/audits", headers=auth, params={"model_id": "a\x00b"}),
            "body": client.post("/v1/audits", headers=auth, json=audit_request("a\x00b")),
            "spec": client.post(
                "/v1/datasets",
                headers=auth,
                files={"file": ("x.npy", images.getvalue(), "application/octet-stream")},
                data={"spec": json.dumps({"name": "a\x00b"})},
            ),
        }
    statuses = {where: answer.status_code for where, answer in answers.items()}
    assert all(400 <= status < 500 for status in statuses.values()), statuses
    assert answers["body"].json()["type"].endswith("/malformed-request")
