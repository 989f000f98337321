"""Admission of an endpoint model (workers.execution.endpoint_admission): the worker probes the
endpoint (metadata, shapes against the spec, answers, value range, determinism, latency) and
writes `ready` or `rejected` with the reason; against the project's fault-injecting endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from schemas.endpoints import EndpointAuth, EndpointLimits, EndpointRegistration
from schemas.model_spec import ModelSpec
from service.db.session import make_engine
from service.db.tables import Base, Model, Tenant
from service.domain.resource_rules import model_resource, new_endpoint_model
from service.settings import Settings
from tests.fixtures.oip_server import Fault, LinearModel, OIPServer
from workers.execution.admission_job import execute_admission
from workers.execution.endpoint_admission import admit_endpoint
from workers.shared.inference_protocol import RetryPolicy

SHAPE = (1, 4, 4)
SPEC = ModelSpec(name="linear", task="reconstruction", input="image", image_shape=SHAPE)
SECRET = "Bearer admission-secret-77"
QUICK = RetryPolicy(attempts=2, backoff_seconds=0.01)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        endpoint_allow="127.0.0.1",
    )


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    engine = make_engine(settings.resolved_database_url)
    Base.metadata.create_all(engine)
    with sessionmaker(engine, expire_on_commit=False)() as opened:
        yield opened
    engine.dispose()


def register(
    session: Session, settings: Settings, server: OIPServer, spec: ModelSpec = SPEC, **extra: Any
) -> Model:
    tenant = session.query(Tenant).first() or Tenant(name="vendor")
    session.add(tenant)
    session.flush()
    registration = EndpointRegistration(
        url=server.url,
        model_name=server.name,
        spec=spec,
        auth=EndpointAuth(secret=SECRET),  # type: ignore[arg-type]
        **extra,
    )
    model = new_endpoint_model(tenant, registration, settings)
    session.add(model)
    session.commit()
    return model


def admitted(session: Session, model: Model) -> Model:
    session.expire_all()
    found = session.get(Model, model.id)
    assert found is not None
    return found


def test_a_linear_endpoint_is_admitted_with_its_facts(session: Session, settings: Settings) -> None:
    model_fn = LinearModel(SHAPE, SHAPE, [0.5, 0.25], seed=2)
    with OIPServer(model_fn, SHAPE, SHAPE) as server:
        model = register(session, settings, server)
        assert execute_admission(model.id, settings=settings, session=session) == "ready"
    row = admitted(session, model)
    assert (row.status, row.reason) == ("ready", None)
    facts = row.admission_info["endpoint"]
    assert facts["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]}
    assert facts["stochastic"] is False and facts["output_spread"] == 0.0
    assert facts["queries"] == {"sent": 4, "answered": 4, "requests": 3, "failures": 0}
    assert facts["latency_seconds"]["p50"] > 0
    lo, hi = facts["output_range"]
    assert lo < 0 < hi and 0 < facts["output_in_value_range"] < 1  # a linear map's signs
    # the secret was sent (decrypted by the worker) and is nowhere in what is stored
    assert all(r.headers["Authorization"] == SECRET for r in server.requests)
    assert "admission-secret" not in str(row.admission_info)
    assert model_resource(row).stochastic is False


def test_a_sampler_is_stochastic(session: Session, settings: Settings) -> None:
    rng = np.random.default_rng(0)

    def noisy(batch: np.ndarray) -> np.ndarray:
        return batch + 0.1 * rng.standard_normal(batch.shape).astype(np.float32)

    with OIPServer(noisy, SHAPE, SHAPE) as server:
        model = register(session, settings, server)
        admit_endpoint(model, settings=settings, session=session, retry=QUICK)
    row = admitted(session, model)
    assert row.status == "ready" and row.admission_info["stochastic"] is True
    assert row.admission_info["output_spread"] > 0.05


def identity(batch: np.ndarray) -> np.ndarray:
    return batch


@pytest.mark.parametrize(
    ("server_options", "spec", "faults", "extra", "words"),
    [
        ({}, SPEC.model_copy(update={"image_shape": (1, 8, 8)}), [], {}, "has shape [-1, 1, 4, 4]"),
        ({"batch_dimension": 4}, SPEC, [], {}, "batch dimension is fixed at 4"),
        ({}, SPEC, [Fault.nan()], {}, "non-finite output"),
        ({}, SPEC, [Fault.status_code(503)] * 2, {}, "failed 2 times"),
        ({}, SPEC, [Fault.wrong_shape()], {}, "wrong shape"),
        ({}, SPEC, [], {"input_name": "x"}, "no input 'x' (it has: input)"),
        (
            {},
            SPEC.model_copy(update={"task": "classification", "num_classes": 3}),
            [],
            {},
            "classification model gives [3]",
        ),
    ],
)
def test_an_endpoint_that_does_not_fit_is_rejected_with_the_reason(
    session: Session,
    settings: Settings,
    server_options: dict[str, Any],
    spec: ModelSpec,
    faults: list[Fault],
    extra: dict[str, Any],
    words: str,
) -> None:
    with OIPServer(identity, SHAPE, SHAPE, **server_options) as server:
        server.fail(*faults)
        model = register(session, settings, server, spec, **extra)
        assert admit_endpoint(model, settings=settings, session=session, retry=QUICK) == (
            "rejected"
        )
    row = admitted(session, model)
    assert row.status == "rejected" and row.reason is not None
    assert row.reason.startswith("the endpoint failed its probe: ") and words in row.reason
    assert "admission-secret" not in row.reason


def test_a_fixed_batch_of_one_is_admitted_with_max_batch_one(
    session: Session, settings: Settings
) -> None:
    with OIPServer(identity, SHAPE, SHAPE, batch_dimension=1) as server:
        model = register(session, settings, server, limits=EndpointLimits(max_batch=1))
        assert admit_endpoint(model, settings=settings, session=session) == "ready"
        assert {r.batch for r in server.requests} == {1}


def test_loopback_is_refused_unless_the_deployment_allows_it(
    session: Session, settings: Settings
) -> None:
    strict = settings.model_copy(update={"endpoint_allow": ""})
    with OIPServer(identity, SHAPE, SHAPE) as server:
        model = register(session, strict, server)
        assert admit_endpoint(model, settings=strict, session=session) == "rejected"
        assert server.requests == []
    reason = admitted(session, model).reason or ""
    assert "127.0.0.1 is a loopback address" in reason and "TIGHTROPE_ENDPOINT_ALLOW" in reason
