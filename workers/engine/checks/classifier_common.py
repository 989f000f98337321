"""What every classifier check starts from: the subject as a classifier, inputs, labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.engine.classifiers import ClassifierSubject
from workers.engine.context import AuditContext, Subject
from workers.shared.errors import EngineInputError


def as_classifier(subject: Subject, kind: str) -> ClassifierSubject:
    if not isinstance(subject, ClassifierSubject):
        raise EngineInputError(f"check {kind!r} audits classifiers (task 'classification')")
    return subject


def classifier_inputs(
    ctx: AuditContext, subject: Subject, indices: Sequence[int], kind: str
) -> tuple[ClassifierSubject, torch.Tensor, torch.Tensor]:
    """The classifier, the images on the unit box and their labels."""
    classifier = as_classifier(subject, kind)
    if ctx.labels is None:
        raise EngineInputError(f"check {kind!r} needs labelled images")
    rows = list(indices)
    return classifier, classifier.to_unit(ctx.images[rows]), ctx.labels[rows]
