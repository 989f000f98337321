"""Splitting an audit into shards (one check × one subject × a slice of images) and deriving
every seed from names, so a shard gives the same result wherever and whenever it runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schemas.audits import AuditConfig
from schemas.checks_classifier import WHOLE_DATASET_KINDS
from schemas.checks_theorem import WHOLE_SET_THEOREM_KINDS


@dataclass(frozen=True)
class Shard:
    shard_id: str
    check_index: int
    kind: str
    subject: str
    start: int  # first image index
    stop: int  # one past the last image index

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))

    @property
    def seed_key(self) -> str:
        """The shard id without the subject: model and baseline get the same random draws, so
        their results compare sample by sample."""
        return shard_id(self.check_index, self.kind, "any", self.start, self.stop)


def shard_id(check_index: int, kind: str, subject: str, start: int, stop: int) -> str:
    return f"c{check_index:02d}-{kind}-{subject}-i{start:05d}-{stop:05d}"


def plan_shards(config: AuditConfig, n_images: int, subjects: list[str]) -> list[Shard]:
    """In order: check by check, subject by subject, slices of `budget.images_per_shard`.
    Kinds that split the images themselves (`universal`: train / held-out) get one shard."""
    return [
        Shard(
            shard_id(index, check.kind, subject, start, min(start + step, n_images)),
            index,
            check.kind,
            subject,
            start,
            min(start + step, n_images),
        )
        for index, check in enumerate(config.checks)
        for step in [_shard_size(config, check.kind, n_images)]
        for subject in subjects
        for start in range(0, n_images, step)
    ]


def _shard_size(config: AuditConfig, kind: str, n_images: int) -> int:
    if kind in WHOLE_DATASET_KINDS or kind in WHOLE_SET_THEOREM_KINDS:
        return max(1, n_images)
    return config.budget.images_per_shard


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (sha256 of their text), e.g. (seed, image, level, sample)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_seed(audit_seed: int, check_seed: int | None) -> int:
    """A check's `seed`; None means the audit's seed."""
    return audit_seed if check_seed is None else check_seed


def shard_seed(audit_seed: int, check_seed_value: int | None, shard: str) -> int:
    """The seed a shard's run gets: from the audit seed, the check's seed and the shard id."""
    return derive_seed("shard", audit_seed, check_seed(audit_seed, check_seed_value), shard)
