"""Every attack check is composed of its threat model and its search settings (schemas/checks.py,
docs/architecture.md): the flat request JSON fills both, each part holds its own fields only,
the wire format is the flat one it always was, and the engine's attacks take the two parts as
separate arguments."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ValidationError

from schemas.audits import AuditRequest
from schemas.checks import WorstCaseCheck, WorstCaseSearch, WorstCaseThreatModel
from schemas.checks_classifier import (
    AdversarialCheck,
    AdversarialSearch,
    AdversarialThreatModel,
    MinimalPerturbationCheck,
    MinimalPerturbationSearch,
    MinimalPerturbationThreatModel,
    UniversalCheck,
    UniversalSearch,
    UniversalThreatModel,
)
from schemas.checks_theorem import (
    FalsePositiveCheck,
    FalsePositiveSearch,
    FalsePositiveThreatModel,
)
from tests.engine.worst_case_fixtures import DenseOperator
from workers.engine import attacks, classifier_attacks
from workers.engine.attacks import SearchSettings, ThreatModel, worst_case_search
from workers.engine.context import Subject

# check → (threat model, search, the check's own fields besides kind), in the wire's order
COMPOSED: dict[type[BaseModel], tuple[type[BaseModel], type[BaseModel], list[str]]] = {
    WorstCaseCheck: (
        WorstCaseThreatModel,
        WorstCaseSearch,
        ["seed", "threshold", "sampler", "certify"],
    ),
    AdversarialCheck: (AdversarialThreatModel, AdversarialSearch, ["seed", "threshold"]),
    MinimalPerturbationCheck: (
        MinimalPerturbationThreatModel,
        MinimalPerturbationSearch,
        ["epsilons", "seed", "threshold"],
    ),
    UniversalCheck: (
        UniversalThreatModel,
        UniversalSearch,
        ["failure_error", "seed", "threshold"],
    ),
    FalsePositiveCheck: (
        FalsePositiveThreatModel,
        FalsePositiveSearch,
        ["panels", "seed", "threshold", "sampler"],
    ),
}

# the request's field order, as it was before the split (the JSON schema's and clients' order)
WIRE_ORDER = {
    WorstCaseCheck: [
        "kind",
        "levels",
        "space",
        "target",
        "formulation",
        "lambda",
        "optimizer",
        "steps",
        "restarts",
        "step_size",
        "early_stop_tolerance",
        "seed",
        "threshold",
        "sampler",
        "certify",
    ],
    AdversarialCheck: [
        "kind",
        "norm",
        "epsilons",
        "attack",
        "steps",
        "restarts",
        "seed",
        "threshold",
    ],
    MinimalPerturbationCheck: ["kind", "norm", "attack", "steps", "epsilons", "seed", "threshold"],
    UniversalCheck: [
        "kind",
        "norm",
        "epsilon",
        "train_fraction",
        "steps",
        "step_size",
        "failure_error",
        "seed",
        "threshold",
    ],
    FalsePositiveCheck: [
        "kind",
        "delta",
        "window",
        "steps",
        "restarts",
        "step_size",
        "panels",
        "seed",
        "threshold",
        "sampler",
    ],
}

FLAT_WORST_CASE: dict[str, Any] = {
    "kind": "worst_case",
    "levels": [0.01, 0.03],
    "space": "image",
    "target": "reconstruction",
    "formulation": "penalized",
    "lambda": 2.5,
    "optimizer": "ensemble",
    "steps": 40,
    "restarts": 6,
    "step_size": 0.4,
    "early_stop_tolerance": 0.0,
    "seed": 9,
    "threshold": {"max_relative_error": 0.3, "at_level": 0.03},
}


def test_worst_case_parts_from_flat_json_hold_their_own_fields() -> None:
    check = WorstCaseCheck.model_validate(FLAT_WORST_CASE)
    threat, search = check.threat_model(), check.search_settings()
    assert type(threat) is WorstCaseThreatModel and type(search) is WorstCaseSearch
    assert threat.model_dump(by_alias=True) == {
        "levels": [0.01, 0.03],
        "space": "image",
        "target": "reconstruction",
        "formulation": "penalized",
        "lambda": 2.5,
    }
    assert search.model_dump() == {
        "optimizer": "ensemble",
        "steps": 40,
        "restarts": 6,
        "step_size": 0.4,
        "early_stop_tolerance": 0.0,
    }
    # each part is a valid model of its own, and a copy: changing it leaves the check alone
    assert WorstCaseThreatModel.model_validate(threat.model_dump(by_alias=True)) == threat
    assert WorstCaseSearch.model_validate(search.model_dump()) == search
    threat.levels.append(0.5)
    assert check.levels == [0.01, 0.03]


def test_parts_keep_which_fields_were_given() -> None:
    check = WorstCaseCheck.model_validate({"kind": "worst_case", "lambda": 3.0, "steps": 7})
    assert check.threat_model().model_dump(by_alias=True, exclude_unset=True) == {"lambda": 3.0}
    assert check.search_settings().model_dump(exclude_unset=True) == {"steps": 7}
    assert check.threat_model().levels == [0.01, 0.02, 0.05]  # the defaults fill the rest


@pytest.mark.parametrize("check_type", list(COMPOSED), ids=lambda t: t.__name__)
def test_parts_split_every_attack_field_once_in_the_wire_order(check_type: type[BaseModel]) -> None:
    threat_type, search_type, own = COMPOSED[check_type]
    threat_fields, search_fields = list(threat_type.model_fields), list(search_type.model_fields)
    assert not set(threat_fields) & set(search_fields)
    assert list(check_type.model_fields) == ["kind", *threat_fields, *search_fields, *own]
    assert issubclass(check_type, threat_type) and issubclass(check_type, search_type)
    check = check_type()
    assert type(check.threat_model()) is threat_type  # type: ignore[attr-defined]
    assert type(check.search_settings()) is search_type  # type: ignore[attr-defined]
    schema = check_type.model_json_schema()
    assert list(schema["properties"]) == WIRE_ORDER[check_type]
    assert schema["required"] == ["kind"]
    assert schema["additionalProperties"] is False


def test_the_request_schema_stays_flat() -> None:
    """No part appears in the request's JSON schema: a check is one flat object."""
    definitions = set(AuditRequest.model_json_schema()["$defs"])
    parts = {part.__name__ for threat, search, _ in COMPOSED.values() for part in (threat, search)}
    assert not parts & definitions
    assert {check.__name__ for check in COMPOSED} <= definitions


def test_flat_json_round_trips_and_unknown_fields_still_fail() -> None:
    check = WorstCaseCheck.model_validate_json(json.dumps(FLAT_WORST_CASE))
    assert check.model_dump(mode="json", by_alias=True, exclude_unset=True) == FLAT_WORST_CASE
    adversarial = {"kind": "adversarial", "norm": "l2", "epsilons": [0.5], "attack": "pgd"}
    parsed = AdversarialCheck.model_validate(adversarial)
    assert parsed.model_dump(mode="json", exclude_unset=True) == adversarial
    assert parsed.threat_model().model_dump() == {"norm": "l2", "epsilons": [0.5]}
    assert parsed.search_settings().model_dump() == {"attack": "pgd", "steps": 100, "restarts": 1}
    with pytest.raises(ValidationError):
        WorstCaseCheck.model_validate({**FLAT_WORST_CASE, "threat_model": {}})
    # the validators of each part still run on the flat check
    with pytest.raises(ValidationError, match="strictly increasing"):
        WorstCaseCheck.model_validate({"kind": "worst_case", "levels": [0.2, 0.1]})
    with pytest.raises(ValidationError, match="strictly increasing"):
        AdversarialCheck.model_validate({"kind": "adversarial", "epsilons": [0.2, 0.1]})
    # and a rule across both parts stays on the check
    with pytest.raises(ValidationError, match="l2 norm only"):
        MinimalPerturbationCheck.model_validate(
            {"kind": "minimal_perturbation", "norm": "linf", "attack": "ddn"}
        )


def test_engine_settings_are_read_from_their_own_part() -> None:
    check = WorstCaseCheck.model_validate(FLAT_WORST_CASE)
    threat = ThreatModel.from_check(check.threat_model())
    settings = SearchSettings.from_check(check.search_settings())
    assert threat == ThreatModel(
        levels=(0.01, 0.03),
        space="image",
        target="reconstruction",
        formulation="penalized",
        penalty=2.5,
    )
    assert settings == SearchSettings(
        optimizer="ensemble",
        steps=40,
        restarts=6,
        step_size=0.4,
        early_stop_tolerance=0.0,
        check_every=8,
    )
    threat_names = {f.name for f in dataclasses.fields(ThreatModel)}
    search_names = {f.name for f in dataclasses.fields(SearchSettings)}
    assert threat_names == {"levels", "space", "target", "formulation", "penalty"}
    assert not threat_names & search_names


def test_attacks_take_the_threat_model_and_the_search_apart() -> None:
    def parameters(function: Any) -> list[str]:
        return list(inspect.signature(function).parameters)

    assert parameters(attacks.worst_case_search)[4:6] == ["threat", "settings"]
    assert parameters(classifier_attacks.run_ball_attack)[3:] == ["threat", "search"]
    assert parameters(classifier_attacks.minimal_adversarial)[3:] == ["threat", "search"]


def test_same_search_under_two_threat_models() -> None:
    """One SearchSettings, two ThreatModels: the levels and the target come from the threat
    model alone."""
    gen = torch.Generator().manual_seed(0)
    operator = DenseOperator(torch.randn(8, 12, generator=gen), (1, 3, 4))
    x = torch.rand(2, 1, 3, 4, generator=gen)
    y = operator.A(x)
    matrix = torch.randn(12, 8, generator=gen)
    subject = Subject("model", lambda v: torch.tanh(v @ matrix.T).view(-1, 1, 3, 4))
    settings = SearchSettings(steps=6, restarts=2, early_stop_tolerance=0.0)
    small = worst_case_search(subject, operator, y, x, ThreatModel((0.05,)), settings, [1, 2])
    both = worst_case_search(subject, operator, y, x, ThreatModel((0.05, 0.2)), settings, [1, 2])
    assert [o.level for o in small] == [0.05] and [o.level for o in both] == [0.05, 0.2]
    for outcome in both:
        assert torch.all(
            operator.norm(outcome.perturbation) <= outcome.level * operator.norm(y) * (1 + 1e-6)
        )
