"""Running an audit on a model already in memory: shards, merge, report.

`run_audit_with_model` is what the runner (through workers.engine.entry_points.run_audit) and the
tests call. Every shard's result is handed to `on_shard` as it finishes, in an envelope that also
carries its cost, so a resumed audit (`completed_shards`) reproduces the same report."""

from __future__ import annotations

import contextlib
import os
import time
import warnings as pywarnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.audits import AuditConfig
from schemas.checks import Baseline
from schemas.checks_classifier import task_problems
from schemas.common import SAFE_NAME
from schemas.comparisons import comparison_section, spec_problems
from schemas.datasets import BuiltinDataset
from schemas.model_spec import ModelSpec
from schemas.operators import DenoisingOperator
from schemas.verdicts import check_verdict, proven_by
from schemas.verdicts import compare as threshold_comparison
from workers.engine.baselines import build_baseline
from workers.engine.classifiers import classifier_subject
from workers.engine.context import (
    ARTIFACT_FILES_KEY,
    AuditContext,
    Operator,
    PassCounter,
    Reconstructor,
    Subject,
)
from workers.engine.devices import resolve_device
from workers.engine.endpoint_model import check_query_only_config, is_query_only, query_scope
from workers.engine.ground_truth import fit_images_to_spec, load_images, scale_to_range
from workers.engine.labelled import load_labelled
from workers.engine.operators import build_operator
from workers.engine.registry import get_check
from workers.engine.report import build_report, write_report
from workers.engine.shards import Shard, derive_seed, plan_shards, shard_seed
from workers.engine.subjects import model_subject
from workers.shared.errors import AuditCancelled, EndpointQueryFailed, EngineInputError

ProgressFn = Callable[[float, str | None, str | None], None]
ShardFn = Callable[[str, dict[str, Any]], None]
BaselineBuilder = Callable[[Baseline, Operator], Reconstructor]


@dataclass
class Reference:
    """The model compared with (`compare_with`): loaded, its spec, and its identity in the
    report (`{id, name, sha256, format, spec}`, as the report's `model`)."""

    model: torch.nn.Module
    spec: ModelSpec
    identity: dict[str, Any]


def subject_names(config: AuditConfig, compare: bool) -> list[str]:
    """The audit's subjects in shard and report order: model, reference, baseline."""
    return (
        ["model"]
        + (["reference"] if compare else [])
        + (["baseline"] if config.baseline is not None else [])
    )


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the audit (warn where torch has none), restored afterwards."""
    # cuBLAS reads this when it starts; without it deterministic matmuls on the GPU raise.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic = previous[2]
        torch.backends.cudnn.benchmark = previous[3]


def run_audit_with_model(
    model: torch.nn.Module,
    spec: ModelSpec,
    config: AuditConfig,
    *,
    out_dir: Path,
    model_sha256: str,
    model_name: str | None = None,
    format: str = "eager",
    audit_id: str | None = None,
    model_id: str | None = None,
    base_dir: Path | None = None,
    baseline_builder: BaselineBuilder | None = None,
    completed_shards: dict[str, dict[str, Any]] | None = None,
    on_progress: ProgressFn | None = None,
    on_shard: ShardFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    only_shards: list[str] | None = None,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """Run every shard not in `completed_shards`, merge, write out_dir/report.json and the
    artifacts, and return the report. Raises EngineInputError for inputs that cannot work
    together and AuditCancelled when `should_stop` says so between shards.

    With `only_shards`, run just those shards (one task of a distributed audit) and return
    `{"shards": [ids run]}`: no merge, no report.

    With `reference`, that model is a second subject on the same images, draws and seeds, and
    the report gets a `comparison` (schemas.comparisons).

    An endpoint model (workers.engine.endpoint_model) runs only the checks that need no
    gradients or weights (EngineInputError otherwise), each shard's queries charged to its
    check."""
    started = time.perf_counter()
    progress = on_progress or (lambda fraction, check, message: None)
    stop = should_stop or (lambda: False)
    device = resolve_device(config.device)
    if is_query_only(model) or (reference is not None and is_query_only(reference.model)):
        check_query_only_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    with deterministic():
        progress(0.0, None, "preparing operator and images")
        ctx = _context(spec, config, device, base_dir)
        if isinstance(model, torch.nn.Module):
            model = model.to(device)
        subjects = {"model": _model_subject(model, spec, ctx)}
        if reference is not None:
            problems = spec_problems(spec, reference.spec)
            if problems:
                raise EngineInputError("the reference model does not fit: " + "; ".join(problems))
            if isinstance(reference.model, torch.nn.Module):
                reference.model = reference.model.to(device)
            subjects["reference"] = replace(
                _model_subject(reference.model, reference.spec, ctx), name="reference"
            )
        baseline = _baseline_subject(config, ctx, baseline_builder)
        if baseline is not None:
            subjects["baseline"] = baseline
        if spec.task == "reconstruction":
            _enable_rebuilding(
                ctx, config, base_dir, model, spec, subjects, baseline_builder, reference
            )
        shards = plan_shards(config, ctx.images.shape[0], list(subjects))
        # Is the model a sampler? Measured before any shard (every task of a distributed audit
        # measures the same: torch's generator seeded with the audit's seed, in a forked state),
        # on the admission probe's input, outside the counted passes: a deterministic model's
        # figures and cost do not change (docs/models.md, "Stochastic models"). A sampler's
        # checks then audit its average map (workers.engine.sampling). A merge of stored
        # shards whose tasks all found the model(s) deterministic takes their measurement
        # instead of calling the model DETECTION_CALLS times again; an endpoint's finalising
        # run still measures, as its query ledger counts those calls.
        queried = is_query_only(model) or (reference is not None and is_query_only(reference.model))
        stored = (
            None
            if only_shards is not None or queried
            else stored_sampling(shards, completed_shards or {}, reference is not None)
        )
        sampling = stored["model"] if stored else _sampling(model, spec, ctx, config.seed)
        reference_sampling = None
        if reference is not None:
            reference_sampling = (
                stored["reference"]
                if stored
                else _sampling(reference.model, reference.spec, ctx, config.seed)
            )
        if spec.task == "reconstruction":
            _mark_stochastic(subjects, "model", sampling)
            _mark_stochastic(subjects, "reference", reference_sampling)
        if only_shards is not None:
            shards = _select_shards(shards, only_shards)
        modules = {"model": model, "reference": None if reference is None else reference.model}
        records = _run_shards(
            config,
            ctx,
            subjects,
            shards,
            completed_shards or {},
            progress,
            on_shard,
            stop,
            started,
            modules,
            _sampling_record(sampling, reference_sampling, reference is not None),
        )
        if only_shards is not None:
            return {"shards": [shard.shard_id for shard in shards]}
        report = _assemble_report(
            config,
            ctx,
            shards,
            records,
            out_dir,
            audit_id=audit_id,
            identity={
                "id": model_id,
                "name": model_name or spec.name,
                "sha256": model_sha256,
                "format": format,
                "spec": spec.model_dump(mode="json"),
            },
            stochastic={name for name, subject in subjects.items() if subject.stochastic},
            sampling=sampling,
            reference_sampling=reference_sampling,
            reference_identity=None if reference is None else reference.identity,
            noise_floor=lambda: _noise_floor(subjects["model"], ctx, config.seed),
            completed=completed_shards or {},
            started=started,
        )
    write_report(report, out_dir)
    progress(1.0, None, "report written")
    return report


def merge_stored_shards(
    spec: ModelSpec,
    config: AuditConfig,
    *,
    out_dir: Path,
    completed_shards: dict[str, dict[str, Any]],
    identity: dict[str, Any],
    audit_id: str | None = None,
    base_dir: Path | None = None,
    reference: tuple[ModelSpec, dict[str, Any]] | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any] | None:
    """The finalising run of a distributed audit without loading a model: when every planned
    shard is stored with its task's stochasticity measurement, all deterministic
    (`stored_sampling`), merge them, write out_dir/report.json and its artifacts and
    return the report, the same as run_audit_with_model's merge of the same shards. Otherwise
    None, having written nothing: the caller loads the model(s) and runs run_audit_with_model
    (a sampler's noise floor needs calls of the model; a missing shard is run). `identity`:
    the report's model {id, name, sha256, format, spec}; `reference`: (spec, identity) of the
    model compared with."""
    started = time.perf_counter()
    progress = on_progress or (lambda fraction, check, message: None)
    device = resolve_device(config.device)
    with deterministic():
        ctx = _context(spec, config, device, base_dir)
        if reference is not None:
            problems = spec_problems(spec, reference[0])
            if problems:
                raise EngineInputError("the reference model does not fit: " + "; ".join(problems))
        shards = plan_shards(
            config, ctx.images.shape[0], subject_names(config, reference is not None)
        )
        stored = stored_sampling(shards, completed_shards, reference is not None)
        if stored is None:
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        progress(0.0, None, "preparing operator and images")
        report = _assemble_report(
            config,
            ctx,
            shards,
            {shard.shard_id: completed_shards[shard.shard_id] for shard in shards},
            out_dir,
            audit_id=audit_id,
            identity=identity,
            stochastic=set(),
            sampling=stored["model"],
            reference_sampling=stored.get("reference"),
            reference_identity=None if reference is None else reference[1],
            noise_floor=lambda: None,
            completed=completed_shards,
            started=started,
        )
    write_report(report, out_dir)
    progress(1.0, None, "report written")
    return report


# A shard record's key for the stochasticity its task measured: {"model": ..., "reference":
# ...} (the model subjects only), each as `_sampling` returned it.
SAMPLING_KEY = "sampling"


def _sampling_record(
    sampling: dict[str, Any] | None, reference_sampling: dict[str, Any] | None, compare: bool
) -> dict[str, Any]:
    return {"model": sampling, **({"reference": reference_sampling} if compare else {})}


def stored_sampling(
    shards: list[Shard], completed: dict[str, dict[str, Any]], compare: bool
) -> dict[str, dict[str, Any]] | None:
    """The stochasticity of the model (and the reference) as the audit's shard tasks measured
    it, when every one of `shards` is stored and their records say the same: deterministic,
    for each model subject. None otherwise (shards stored by an older version, shards still
    to run, a measurement that failed, a sampler, tasks that disagree): the finalising run
    then measures it itself (a sampler's noise floor needs calls of the model anyway)."""
    wanted = ["model", "reference"] if compare else ["model"]
    found: Any = None
    for shard in shards:
        record = completed.get(shard.shard_id)
        if not isinstance(record, dict) or "result" not in record:
            return None
        sampling = record.get(SAMPLING_KEY)
        if not isinstance(sampling, dict) or sorted(sampling) != sorted(wanted):
            return None
        if found is None:
            found = sampling
        elif sampling != found:
            return None
    if not isinstance(found, dict):
        return None
    for name in wanted:
        measured = found[name]
        if not isinstance(measured, dict) or measured.get("stochastic") is not False:
            return None
    return {name: dict(found[name]) for name in wanted}


def _assemble_report(
    config: AuditConfig,
    ctx: AuditContext,
    shards: list[Shard],
    records: dict[str, dict[str, Any]],
    out_dir: Path,
    *,
    audit_id: str | None,
    identity: dict[str, Any],
    stochastic: set[str],
    sampling: dict[str, Any] | None,
    reference_sampling: dict[str, Any] | None,
    reference_identity: dict[str, Any] | None,
    noise_floor: Callable[[], dict[str, Any] | None],
    completed: dict[str, dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    """Merge the shards' records into the report (its artifacts written to out_dir):
    `stochastic`, the subjects audited as samplers (the model's `noise_floor` is called
    only when it is one)."""
    checks = _merge(config, shards, records, out_dir, stochastic)
    _warn_if_stochastic(checks, "model", sampling, ctx.warnings)
    if reference_identity is not None:
        _warn_if_stochastic(checks, "reference", reference_sampling, ctx.warnings)
    floor = noise_floor() if "model" in stochastic else None
    # Compute time: each shard's own seconds (wherever it ran) plus this run's merge, so a
    # report assembled from shards of many workers counts all of them, once.
    ran_here = {shard_id for shard_id in records if shard_id not in completed}
    shard_seconds = sum(
        float(r.get("wall_seconds", 0.0)) for k, r in records.items() if k not in ran_here
    )
    cost = {
        "wall_seconds": round(time.perf_counter() - started + shard_seconds, 3),
        "forward_passes": sum(r["forward_passes"] for r in records.values()),
        "backward_passes": sum(r["backward_passes"] for r in records.values()),
    }
    if floor is not None:  # the noise floor's calls, made here
        cost["forward_passes"] += floor.pop("forward_passes")
    model_comparisons = _sampler_comparisons(config, "model" in stochastic, floor, ctx.warnings)
    return build_report(
        audit_id=audit_id,
        model={
            **identity,
            **_identity_fields(sampling),
            **({} if floor is None else {"noise_floor": floor}),
            **({} if model_comparisons is None else {"comparisons": model_comparisons}),
        },
        config=config,
        device=ctx.device,
        checks=checks,
        cost=cost,
        warnings=ctx.warnings,
        comparison=None
        if reference_identity is None
        else comparison_section(config.checks, checks, reference_identity),
    )


def _spread_words(spread: float | None) -> str:
    return "beyond any bound" if spread is None else f"{spread:.3g}"


# What a single draw means in each check that does not audit a sampler's average map or
# probabilities: the `sampler.measures` of its result, and the end of its warning.
_DIFFERENCE = (
    "a difference of two calls includes the sampler's spread, about √2 times the noise floor "
    "(model.noise_floor) in norm, and counts it as change"
)
SINGLE_DRAW_MEASURES = {
    "kernel": "single draws: every reconstruction (of x, of x + z for the null-space detail, "
    "of each pair's images, and the confirmation search's) is one call of the sampler, so the "
    "hallucination figure and each certificate's output distance compare two draws ("
    + _DIFFERENCE
    + "); a certificate's recovery errors are those of one draw each, so its bound is proven "
    "for those draws, not for the average map or for every draw",
    "more_samples": "single draws: the PSNR at each sampling level is that of one call per "
    "image, below the average map's by the sampler's spread, and a fall between two levels "
    "compares two draws per image, so the spread alone can make (or hide) a fall of up to "
    "about the noise floor's share of the error",
    "random_noise": "single draws: each prediction is one call of the model, so the accuracy "
    "and failure probability count the sampler's own label changes as errors under noise",
    "adversarial": "single draws: each prediction (the attack's and the judged one) is one call "
    "of the model, so the robust accuracy counts the sampler's own label changes as "
    "adversarial errors, and the attack's gradients are those of single draws",
    "minimal_perturbation": "single draws: each prediction is one call of the model, so a "
    "label change the sampler makes on its own shortens the minimal norm found",
    "universal": "single draws: each prediction is one call of the model, so the fooling rate "
    "counts the sampler's own label changes as fooled predictions",
}
SINGLE_DRAW_DEFAULT = (
    "single draws: every output is one call of the sampler, so the figures count its sampling "
    "noise as instability"
)


def stochastic_warning(
    spread: float | None, subject: str = "model", kind: str | None = None
) -> str:
    """The warning each check of a stochastic subject that measures single draws carries
    (docs/reports.md); with `kind`, it ends by saying what a single draw means there."""
    warning = (
        f"the {subject} is stochastic (output spread {_spread_words(spread)} at a fixed input): "
        "this figure counts its sampling noise as instability; it measures single draws of the "
        "sampler, not its average reconstruction (docs/theorem.md, 'Stochastic models')"
    )
    if kind is None:
        return warning
    return f"{warning}. Here: {SINGLE_DRAW_MEASURES.get(kind, SINGLE_DRAW_DEFAULT)}"


def _sampling(model: Any, spec: ModelSpec, ctx: AuditContext, seed: int) -> dict[str, Any] | None:
    """`{"stochastic", "output_spread"}` of the model on the admission probe's input (through
    the audit's operator), calls from torch's generator seeded with the audit's seed until two
    differ (at most DETECTION_CALLS); None when the probe's input cannot be made or a call
    fails."""
    from workers.engine.probe import DETECTION_CALLS, measure_stochasticity, probe_input

    try:
        x, _ = probe_input(spec, ctx.device, ctx.operator)  # type: ignore[arg-type]
    except EndpointQueryFailed:
        raise  # a query that failed never passes for a measurement
    except Exception:  # noqa: BLE001 - the checks have run; nothing here may fail the audit
        return None
    if x is None:
        return None
    return measure_stochasticity(model, x, seed, DETECTION_CALLS)


def _mark_stochastic(
    subjects: dict[str, Subject], name: str, sampling: dict[str, Any] | None
) -> None:
    if name in subjects and sampling is not None and sampling["stochastic"]:
        subjects[name] = replace(subjects[name], stochastic=True)


def _noise_floor(subject: Subject, ctx: AuditContext, seed: int) -> dict[str, Any] | None:
    """The model's noise floor (workers.engine.sampling.noise_floor) at the measurements of the
    audit's first NOISE_FLOOR_INPUTS images, draws seeded with the audit's seed; its
    `forward_passes` for the cost. None when a call fails (the checks have run already)."""
    from workers.engine.sampling import NOISE_FLOOR_INPUTS, noise_floor, same_draws

    before = subject.counter.forward
    try:
        y = ctx.measurements(range(min(NOISE_FLOOR_INPUTS, ctx.images.shape[0])))
        with same_draws(derive_seed("noise_floor", seed), ctx.device):
            floor = noise_floor(subject.reconstruct, y)
    except EndpointQueryFailed:
        raise
    except Exception:  # noqa: BLE001 - uploaded code; nothing here may fail the audit
        return None
    return {**floor, "forward_passes": subject.counter.forward - before}


def _sampler_comparisons(
    config: AuditConfig,
    stochastic: bool,
    floor: dict[str, Any] | None,
    report_warnings: list[str],
) -> list[dict[str, Any]] | None:
    """The report's `model.comparisons` (None without `sampler_threshold`): `max_noise_floor`
    against the upper end of the noise floor's interval, for a stochastic model audited for
    reconstruction (a floor that could not be measured does not pass); otherwise not compared,
    and the report says so."""
    threshold = config.sampler_threshold
    if threshold is None:
        return None
    if not stochastic:
        report_warnings.append(
            "sampler_threshold.max_noise_floor is not compared: the model is not audited as a "
            "sampler (deterministic, or not a reconstruction model), so it has no noise floor"
        )
        return None
    high = None if floor is None else floor.get("ci_high")
    return [threshold_comparison("noise floor (upper 95 % bound)", high, threshold.max_noise_floor)]


def _identity_fields(sampling: dict[str, Any] | None) -> dict[str, Any]:
    """The report's `model.stochastic` (and `output_spread` when it is): absent when unmeasured."""
    if sampling is None:
        return {}
    if not sampling["stochastic"]:
        return {"stochastic": False}
    return {"stochastic": True, "output_spread": sampling["output_spread"]}


def _warn_if_stochastic(
    checks: list[dict[str, Any]],
    subject: str,
    sampling: dict[str, Any] | None,
    report_warnings: list[str],
) -> None:
    """A stochastic subject: the report says so; each of its checks that audits the sampler
    says what it measures in its `sampler` section, every other one carries the warning that
    it measures single draws, and its `sampler` section says what a single draw means there
    (SINGLE_DRAW_MEASURES)."""
    if sampling is None or not sampling["stochastic"]:
        return
    single = []
    for check in checks:
        if check.get("subject") == subject and "sampler" not in check:
            kind = str(check["kind"])
            check.setdefault("warnings", []).append(
                stochastic_warning(sampling["output_spread"], subject, kind)
            )
            check["sampler"] = {
                "single_draws": True,
                "measures": SINGLE_DRAW_MEASURES.get(kind, SINGLE_DRAW_DEFAULT),
            }
            single.append(kind)
    spread = _spread_words(sampling["output_spread"])
    report_warnings.append(
        f"the {subject} is stochastic (output spread {spread} at a fixed input, two calls): "
        "its checks say in their `sampler` section what they measure of the sampler "
        "(docs/theorem.md, 'Auditing a sampler')"
        + (
            "; these measure single draws and count its sampling noise as instability: "
            + ", ".join(single)
            if single
            else ""
        )
    )


def plan_audit(
    spec: ModelSpec, config: AuditConfig, base_dir: Path | None, compare: bool = False
) -> list[Shard]:
    """The audit's shards, in merge order, as every task of it will plan them: the inputs are
    loaded and the operator built once here, so an audit that cannot run fails before any
    shard is sent."""
    with deterministic():
        ctx = _context(spec, config, resolve_device(config.device), base_dir)
    return plan_shards(config, ctx.images.shape[0], subject_names(config, compare))


def _select_shards(shards: list[Shard], wanted: list[str]) -> list[Shard]:
    by_id = {shard.shard_id: shard for shard in shards}
    missing = [shard_id for shard_id in wanted if shard_id not in by_id]
    if missing:
        # The worker's plan and this engine's disagree: a bug, never the user's input.
        raise RuntimeError(f"shards {missing} are not in this audit's plan")
    return [by_id[shard_id] for shard_id in wanted]


def _context(
    spec: ModelSpec, config: AuditConfig, device: torch.device, base_dir: Path | None
) -> AuditContext:
    problems = task_problems(
        spec.task,
        [check.kind for check in config.checks],
        has_operator=config.operator is not None,
        has_baseline=config.baseline is not None,
    )
    if problems:
        raise EngineInputError("; ".join(problems))
    labels: torch.Tensor | None = None
    if spec.task == "classification":
        assert spec.num_classes is not None  # the spec's validator requires it
        images, labels = load_labelled(config.dataset, base_dir, spec.num_classes)
    else:
        images = load_images(config.dataset, base_dir)
    if isinstance(config.dataset, BuiltinDataset):  # phantoms are in [0, 1]; files are as given
        images = scale_to_range(images, spec.value_range)
    images = fit_images_to_spec(images, spec)
    # A classifier sees images: its checks perturb them through the identity operator.
    operator_config = config.operator if config.operator is not None else DenoisingOperator()
    operator = build_operator(operator_config, spec.image_shape, device, base_dir)
    return AuditContext(
        operator=operator,
        images=images.to(device),
        device=device,
        seed=config.seed,
        noise_level=config.noise_level,
        value_range=spec.value_range,
        warnings=[],
        labels=None if labels is None else labels.to(device),
    )


def _model_subject(model: torch.nn.Module, spec: ModelSpec, ctx: AuditContext) -> Subject:
    if spec.task == "classification":
        return classifier_subject(model, spec, PassCounter())
    return model_subject(model, spec, ctx.operator, PassCounter())


def _baseline_subject(
    config: AuditConfig, ctx: AuditContext, builder: BaselineBuilder | None
) -> Subject | None:
    if config.baseline is None:
        return None
    reconstruct = (builder or build_baseline)(config.baseline, ctx.operator)
    counter = PassCounter()

    def counted(y: torch.Tensor) -> torch.Tensor:
        counter.forward += y.shape[0]
        return reconstruct(y)

    return Subject(name="baseline", reconstruct=counted, counter=counter)


def _enable_rebuilding(
    ctx: AuditContext,
    config: AuditConfig,
    base_dir: Path | None,
    model: torch.nn.Module,
    spec: ModelSpec,
    subjects: dict[str, Subject],
    builder: BaselineBuilder | None,
    reference: Reference | None = None,
) -> None:
    """What checks that build other operators need (more_samples): the operator config, the
    base directory, and each subject rebuilt for another operator, counting its passes on the
    subject's own counter."""
    ctx.operator_config = config.operator
    ctx.base_dir = base_dir

    def subject_for(name: str, operator: Operator) -> Subject:
        current = subjects[name]
        if name == "model":
            return model_subject(model, spec, operator, current.counter)
        if name == "reference":
            assert reference is not None  # a reference subject exists only when given
            rebuilt = model_subject(reference.model, reference.spec, operator, current.counter)
            return replace(rebuilt, name="reference")
        assert config.baseline is not None  # a baseline subject exists only when configured
        build = builder or build_baseline
        reconstruct = build(config.baseline, operator)

        def counted(y: torch.Tensor) -> torch.Tensor:
            current.counter.forward += y.shape[0]
            return reconstruct(y)

        return Subject(name=name, reconstruct=counted, counter=current.counter)

    ctx.subject_for = subject_for


def _run_shards(
    config: AuditConfig,
    ctx: AuditContext,
    subjects: dict[str, Subject],
    shards: list[Shard],
    completed: dict[str, dict[str, Any]],
    progress: ProgressFn,
    on_shard: ShardFn | None,
    should_stop: Callable[[], bool],
    started: float,
    modules: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the shards not completed; an endpoint model's queries in a shard are charged to the
    shard's check (`modules`: each subject's model, where it is one). Each record carries
    `sampling` (SAMPLING_KEY), the stochasticity measured before the shards, for the merge."""
    records: dict[str, dict[str, Any]] = {}
    limit = config.budget.wall_seconds
    for position, shard in enumerate(shards, start=1):
        previous = completed.get(shard.shard_id)
        if isinstance(previous, dict) and "result" in previous:
            records[shard.shard_id] = previous
            continue
        if should_stop():
            raise AuditCancelled(f"cancelled before shard {shard.shard_id}")
        if limit is not None and time.perf_counter() - started > limit:
            raise EngineInputError(f"the audit ran past its time budget of {limit} s")
        check = config.checks[shard.check_index]
        subject = subjects[shard.subject]
        before = (subject.counter.forward, subject.counter.backward)
        shard_started = time.perf_counter()
        seed = shard_seed(config.seed, check.seed, shard.seed_key)
        charged = query_scope((modules or {}).get(shard.subject), shard.kind)
        with pywarnings.catch_warnings(), _sampler_draws(subject, seed, ctx.device), charged:
            pywarnings.simplefilter("ignore", UserWarning)  # deepinv / torch chatter per batch
            result = get_check(shard.kind).run(check, ctx, subject, shard.indices, seed)
        record = {
            "shard_id": shard.shard_id,
            "check_index": shard.check_index,
            "kind": shard.kind,
            "subject": shard.subject,
            "start": shard.start,
            "stop": shard.stop,
            "forward_passes": subject.counter.forward - before[0],
            "backward_passes": subject.counter.backward - before[1],
            "wall_seconds": round(time.perf_counter() - shard_started, 3),
            "result": result,
            **({} if sampling is None else {SAMPLING_KEY: sampling}),
        }
        records[shard.shard_id] = record
        if on_shard is not None:
            on_shard(shard.shard_id, record)
        progress(
            position / len(shards),
            shard.kind,
            f"{shard.subject}: images {shard.start}–{shard.stop - 1} done",
        )
    return records


def _sampler_draws(
    subject: Subject, seed: int, device: torch.device
) -> contextlib.AbstractContextManager[None]:
    """A stochastic subject's shard draws from torch's generator seeded with the shard's seed
    (in a forked state): its report is reproducible wherever the shard runs. A deterministic
    subject's shard runs as it always did."""
    if not subject.stochastic:
        return contextlib.nullcontext()
    from workers.engine.sampling import same_draws

    return same_draws(derive_seed("sampler", seed), device)


def _merge(
    config: AuditConfig,
    shards: list[Shard],
    records: dict[str, dict[str, Any]],
    out_dir: Path,
    stochastic: set[str] | None = None,
) -> list[dict[str, Any]]:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for shard in shards:  # shard order: the merge sees images in order
        groups.setdefault((shard.check_index, shard.subject), []).append(
            records[shard.shard_id]["result"]
        )
    checks = []
    for (index, subject), results in groups.items():
        check = config.checks[index]
        merged = get_check(check.kind).merge(check, results)
        files = merged.pop(ARTIFACT_FILES_KEY, None) or {}
        comparisons = list(merged.get("comparisons", []))
        artifacts = list(merged.pop("artifacts", []))
        for name, content in files.items():
            artifacts.append(_write_artifact(out_dir, f"c{index:02d}-{subject}-{name}", content))
        checks.append(
            {
                **merged,
                "kind": check.kind,
                "subject": subject,
                "comparisons": comparisons,
                # computed from the comparisons alone (and, with `certify`, the proof)
                "verdict": check_verdict(comparisons, proven_by(merged)),
                "warnings": list(merged.get("warnings", [])),
                "artifacts": artifacts,
            }
        )
    _add_empirical_lipschitz(checks, stochastic or set())
    return checks


def _add_empirical_lipschitz(checks: list[dict[str, Any]], stochastic: set[str]) -> None:
    """Next to the Jacobian norm, the best ratio ‖Ψ(y+e) − Ψ(y)‖/‖e‖ the perturbation checks
    of the same subject found: both are lower bounds of the local Lipschitz constant. For a
    stochastic subject only the average map's ratios count (checks with a `sampler` section
    that averages): a single draw's ratio measures its sampling noise, not the map."""
    for result in checks:
        if result["kind"] != "lipschitz":
            continue
        found = [
            (level["lipschitz_lower_bound"]["max"], other["kind"], level["level"])
            for other in checks
            if other["subject"] == result["subject"]
            and (other["subject"] not in stochastic or "draws" in other.get("sampler", {}))
            for level in other.get("levels", [])
            if isinstance(level.get("lipschitz_lower_bound"), dict)
            and level["lipschitz_lower_bound"].get("max") is not None
        ]
        best = max(found, default=None)
        result["empirical_lower_bound"] = (
            None if best is None else {"value": best[0], "check": best[1], "level": best[2]}
        )


def _write_artifact(out_dir: Path, name: str, content: Any) -> str:
    is_array = isinstance(content, torch.Tensor | np.ndarray | list)
    if is_array and not name.endswith(".npy"):
        name += ".npy"
    if not SAFE_NAME.match(name):
        raise ValueError(f"artifact name {name!r} is not a safe file name")
    if is_array:
        array = content.detach().cpu().numpy() if isinstance(content, torch.Tensor) else content
        np.save(out_dir / name, np.asarray(array), allow_pickle=False)
    elif isinstance(content, bytes):
        (out_dir / name).write_bytes(content)
    else:
        raise TypeError(
            f"artifact {name!r}: expected an array or bytes, not {type(content).__name__}"
        )
    return name
