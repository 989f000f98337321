"""`universal`: one perturbation u that fools many inputs (Moosavi-Dezfooli et al. 2017).

The images are split by a seeded permutation into a training part (`train_fraction`) and a
held-out part. u is computed on the training part only, by projected gradient ascent on the
mean loss over all training inputs at once (the full-batch form of Shafahi et al.'s SGD-UAP;
the original DeepFool aggregation is slower and no stronger), keeping the u that fooled most
training inputs; the fooling rate reported is measured on the held-out part, with a
Clopper–Pearson interval.

- Classifiers: ‖u‖ ≤ ε in the model's units (ℓ∞ or ℓ2), x + u clipped to the value range; the
  loss is the cross-entropy against the clean prediction (clamped, so inputs already fooled
  stop dominating); an input is fooled when its predicted class changes.
- Reconstruction models: u lives in measurement space on the measured entries
  (operator.project) with ‖u‖ ≤ ε · mean‖y‖ over the training part (operator.norm, ℓ2). An
  image is correct when its relative error ‖Ψ(y) − x‖/‖x‖ is at most `failure_error` τ, and
  fooled when it is correct without u and not with it (error above τ, or not finite). Images
  already wrong without u cannot be fooled: they are counted apart (`clean_failures`) and left
  out of the fooling rate's denominator (a u that fools nothing then scores 0, whatever the
  clean error). The loss is the mean squared relative error ‖Ψ(y + u) − x‖² / ‖x‖² over the
  correct training images (all of them when none is correct).

The check needs the whole dataset at once: it always runs as one shard (shards.py).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from schemas.checks_classifier import UniversalCheck
from schemas.verdicts import compare, judge
from workers.engine import metrics
from workers.engine.classifier_attacks import perturbation_norm, seeded
from workers.engine.classifiers import ClassifierSubject
from workers.engine.context import ARTIFACT_FILES_KEY, AuditContext, Subject
from workers.engine.stats import clopper_pearson
from workers.shared.errors import EngineInputError

BATCH = 128
# Cross-entropy beyond which an input counts as fooled for good (nats): it stops pulling on u.
_LOSS_CLAMP = 10.0


def split(indices: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / held-out split; both parts non-empty."""
    if len(indices) < 2:
        raise EngineInputError("check 'universal' needs at least 2 images (train and held-out)")
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed % 2**63))
    n_train = min(len(indices) - 1, max(1, round(fraction * len(indices))))
    chosen = [int(indices[i]) for i in order]
    return sorted(chosen[:n_train]), sorted(chosen[n_train:])


class Universal:
    kind = "universal"

    def run(
        self,
        config: UniversalCheck,
        ctx: AuditContext,
        subject: Subject,
        indices: Sequence[int],
        seed: int,
    ) -> dict[str, Any]:
        train, held_out = split(indices, config.train_fraction, seed)
        with seeded(seed, ctx.device):
            if isinstance(subject, ClassifierSubject):
                result = _classifier(config, ctx, subject, train, held_out)
            else:
                result = _reconstruction(config, ctx, subject, train, held_out)
        return {**result, "train_images": train, "held_out_images": held_out}

    def merge(self, config: UniversalCheck, shards: list[dict[str, Any]]) -> dict[str, Any]:
        (shard,) = shards  # one shard by construction
        result = {key: value for key, value in shard.items() if key != "perturbation"}
        fooled, trials = result["fooled"], result["trials"]
        warnings: list[str] = []
        if trials:
            low, high = clopper_pearson(fooled, trials)
            result["fooling_rate"] = {"estimate": fooled / trials, "ci_low": low, "ci_high": high}
        else:  # every held-out image already wrong: no data, the vacuous interval
            result["fooling_rate"] = {"estimate": None, "ci_low": 0.0, "ci_high": 1.0}
            warnings.append(
                "every held-out image is already wrong without the perturbation "
                "(relative error above failure_error): the fooling rate is undefined"
            )
            high = 1.0
        result["train_images"] = len(shard["train_images"])
        result["held_out_images"] = len(shard["held_out_images"])
        perturbation = np.asarray(shard["perturbation"], dtype=np.float32)
        result[ARTIFACT_FILES_KEY] = {
            "universal.npy": perturbation,
            "universal.png": _png(shard.get("image_view", shard["perturbation"])),
        }
        result.pop("image_view", None)
        result["warnings"] = warnings
        comparisons = []
        if config.threshold is not None:
            bound = config.threshold.max_fooling_rate
            comparisons.append(compare("fooling rate (upper 95 % bound)", high, bound))
        return judge(result, comparisons)


def _ascend(
    loss_and_fooled: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
    start: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    direction: Callable[[torch.Tensor], torch.Tensor],
    step: float,
    steps: int,
) -> tuple[torch.Tensor, int]:
    """Projected ascent on one perturbation; returns the u that fooled most training inputs
    (ties: the larger loss) and how many it fooled."""
    u = project(start)
    best, best_score = u.clone(), (-1, -float("inf"))
    for _ in range(steps):
        u = u.detach().requires_grad_(True)
        loss, fooled = loss_and_fooled(u)
        if (fooled, float(loss)) > best_score:
            best, best_score = u.detach().clone(), (fooled, float(loss))
        (gradient,) = torch.autograd.grad(loss, u)
        u = project(u.detach() + step * direction(gradient))
    with torch.no_grad():
        loss, fooled = loss_and_fooled(u)
    if (fooled, float(loss)) > best_score:
        best, best_score = u.detach(), (fooled, float(loss))
    return best, best_score[0]


def _classifier(
    config: UniversalCheck,
    ctx: AuditContext,
    subject: ClassifierSubject,
    train: list[int],
    held_out: list[int],
) -> dict[str, Any]:
    norm = config.norm or "linf"
    model, scale = subject.box_model, subject.scale
    radius = config.epsilon / scale  # on the unit box
    u_train = subject.to_unit(ctx.images[train])
    clean_train = subject.predict(ctx.images[train])

    def loss_and_fooled(u: torch.Tensor) -> tuple[torch.Tensor, int]:
        total, fooled = torch.zeros((), device=u.device), 0
        for start in range(0, len(train), BATCH):
            logits = model((u_train[start : start + BATCH] + u).clamp(0.0, 1.0))
            target = clean_train[start : start + BATCH]
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            total = total + ce.clamp(max=_LOSS_CLAMP).sum()
            fooled += int((logits.argmax(dim=1) != target).sum())
        return total / len(train), fooled

    def project(u: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return u.clamp(-radius, radius)
        return u * (radius / perturbation_norm(u[None], "l2").clamp_min(1e-12)).clamp(max=1.0)

    def direction(gradient: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return gradient.sign()
        return gradient / perturbation_norm(gradient[None], "l2").clamp_min(1e-12)

    start = (torch.rand(u_train.shape[1:], device=ctx.device) * 2 - 1) * radius * 0.1
    u, train_fooled = _ascend(
        loss_and_fooled, start, project, direction, config.step_size * radius, config.steps
    )
    x_held = ctx.images[held_out]
    perturbed = subject.from_unit((subject.to_unit(x_held) + u).clamp(0.0, 1.0))
    clean_held, fooled_held = subject.predict(x_held), subject.predict(perturbed)
    labels = ctx.labels[held_out] if ctx.labels is not None else None
    result: dict[str, Any] = {
        "task": "classification",
        "norm": norm,
        "epsilon": config.epsilon,
        "perturbation_norm": float(perturbation_norm((u * scale)[None], norm)[0]),
        "train_fooling_rate": train_fooled / len(train),
        "fooled": int((fooled_held != clean_held).sum()),
        "trials": len(held_out),
        "perturbation": (u * scale).cpu().tolist(),
    }
    if labels is not None:
        result["held_out_accuracy"] = {
            "clean": float((clean_held == labels).float().mean()),
            "perturbed": float((fooled_held == labels).float().mean()),
        }
    return result


def _reconstruction(
    config: UniversalCheck,
    ctx: AuditContext,
    subject: Subject,
    train: list[int],
    held_out: list[int],
) -> dict[str, Any]:
    if config.norm == "linf":
        raise EngineInputError(
            "check 'universal' on a reconstruction model measures u in measurement space with "
            "the operator's l2 norm: set norm 'l2' or leave it out"
        )
    operator = ctx.operator
    tau = config.failure_error
    y_train, x_train = ctx.measurements(train), ctx.images[train]
    radius = config.epsilon * float(operator.norm(y_train).mean())
    with torch.no_grad():
        train_correct = torch.cat(
            [
                metrics.relative_error(
                    subject.reconstruct(y_train[s : s + BATCH]), x_train[s : s + BATCH]
                )
                <= tau
                for s in range(0, len(train), BATCH)
            ]
        )
    # images already wrong cannot be fooled, and their large errors would dominate the gradient
    weights = train_correct.float() if bool(train_correct.any()) else torch.ones(len(train))
    weights = weights.to(ctx.device)

    def loss_and_fooled(u: torch.Tensor) -> tuple[torch.Tensor, int]:
        total, fooled = torch.zeros((), device=u.device), 0
        for start in range(0, len(train), BATCH):
            x = x_train[start : start + BATCH]
            out = subject.reconstruct(y_train[start : start + BATCH] + u)
            subject.counter.backward += x.shape[0] if u.requires_grad else 0
            squared = (out - x).flatten(1).square().sum(1) / x.flatten(1).square().sum(1)
            total = total + (weights[start : start + BATCH] * squared.clamp_min(0)).sum()
            wrong = ~(squared.detach().sqrt() <= tau)  # NaN counts as wrong
            fooled += int((wrong & train_correct[start : start + BATCH]).sum())
        return total / weights.sum(), fooled

    def project(u: torch.Tensor) -> torch.Tensor:
        u = operator.project(u[None])[0]
        return u * (radius / operator.norm(u[None]).clamp_min(1e-12)[0]).clamp(max=1.0)

    def direction(gradient: torch.Tensor) -> torch.Tensor:
        gradient = operator.project(gradient[None])[0]
        return gradient / operator.norm(gradient[None]).clamp_min(1e-12)[0]

    start = torch.randn(y_train.shape[1:], device=ctx.device)
    start = operator.project(start[None])[0]
    start = start * (0.1 * radius / operator.norm(start[None]).clamp_min(1e-12)[0])
    u, train_fooled = _ascend(
        loss_and_fooled, start, project, direction, config.step_size * radius, config.steps
    )
    with torch.no_grad():
        y_held, x_held = ctx.measurements(held_out), ctx.images[held_out]
        clean_error = metrics.relative_error(subject.reconstruct(y_held), x_held)
        error = metrics.relative_error(subject.reconstruct(y_held + u), x_held)
        image_view = operator.A_adjoint(u[None])[0]
    correct = clean_error <= tau  # a NaN clean output is already wrong
    fooled = correct & ~(error <= tau)  # and a NaN perturbed one is fooled
    train_correct_count = int(train_correct.sum())
    return {
        "task": "reconstruction",
        "norm": "l2",
        "epsilon": config.epsilon,
        "radius": radius,
        "perturbation_norm": float(operator.norm(u[None])[0]),
        "failure_error": tau,
        "train_fooling_rate": (train_fooled / train_correct_count if train_correct_count else None),
        "train_clean_failures": len(train) - train_correct_count,
        "fooled": int(fooled.sum()),
        "trials": int(correct.sum()),
        "clean_failures": int((~correct).sum()),
        "held_out_relative_error": {
            "clean_mean": float(clean_error.mean()),
            "perturbed_mean": float(error.mean()),
        },
        "perturbation": u.cpu().tolist(),
        "image_view": image_view.cpu().tolist(),
    }


def _png(values: Any) -> bytes:
    """The perturbation as a picture: one channel (or the magnitude of two) on a diverging
    scale centred on 0, or RGB for three channels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] == 3:
        scaled = 0.5 + array.transpose(1, 2, 0) / (2 * max(float(np.abs(array).max()), 1e-12))
        buffer = io.BytesIO()
        mpimg.imsave(buffer, np.clip(scaled, 0.0, 1.0), format="png")
        return buffer.getvalue()
    if array.ndim == 3 and array.shape[0] == 2:
        array = np.hypot(array[0], array[1])
    elif array.ndim == 3:
        array = array[0]
    while array.ndim > 2:  # measurement layouts with more axes: show the first plane
        array = array[0]
    if array.ndim == 1:
        array = array[None]
    bound = max(float(np.abs(array).max()), 1e-12)
    buffer = io.BytesIO()
    mpimg.imsave(buffer, array, cmap="seismic", vmin=-bound, vmax=bound, format="png")
    return buffer.getvalue()
