"""Wording shared by every user-facing text (API messages, console, CLI): counts with nouns."""

from __future__ import annotations


def count_of(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and `noun`, the noun in the plural unless the count is exactly one:
    "1 shard", "0 shards", "3 shards"."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"
