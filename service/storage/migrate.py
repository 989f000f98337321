"""`tightrope storage migrate`: copy a data directory's blobs, reports and artifacts into the
object store the settings name (docs/deployment.md, "Moving to object storage").

Every file under `<data_dir>/blobs` (content-addressed: its name is its sha256, checked before
it is copied) and `<data_dir>/artifacts` is uploaded under the same key, then read back and
checked against its sha256. An object that is already there with the same sha256 is left as it
is, so the command is safe to run twice (or again after an interruption); one there with other
bytes is replaced. Staging files (`blobs/tmp`, `.partial-*`) are not data and stay behind.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.storage.objects import ObjectCorrupt, ObjectMissing, ObjectStore
from service.storage.stores import sha256_file

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class MigrationReport:
    copied: int = 0
    already: int = 0
    bytes_copied: int = 0
    problems: list[str] = field(default_factory=list)


def _files(data_dir: Path) -> list[tuple[str, Path]]:
    """(key, file) of every blob and artifact of the data directory, in key order."""
    found: list[tuple[str, Path]] = []
    for top in ("blobs", "artifacts"):
        root = data_dir / top
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.name.startswith(".partial-"):
                continue
            relative = path.relative_to(data_dir).as_posix()
            if top == "blobs" and relative.startswith("blobs/tmp/"):
                continue
            found.append((relative, path))
    return found


def _verified(target: ObjectStore, key: str, digest: str, scratch: Path) -> bool:
    """The object under `key` reads back with this sha256 (downloaded and hashed)."""
    try:
        target.get_file(key, scratch / "check", digest)
    except (ObjectCorrupt, ObjectMissing):
        return False
    finally:
        (scratch / "check").unlink(missing_ok=True)
    return True


def migrate(
    data_dir: Path, target: ObjectStore, progress: Callable[[str], None] = lambda _: None
) -> MigrationReport:
    """Copy and verify; StorageError (unreachable, refused, full) ends it, and running it
    again goes on where it stopped."""
    report = MigrationReport()
    with tempfile.TemporaryDirectory(prefix="tightrope-migrate-") as tmp:
        scratch = Path(tmp)
        for key, path in _files(data_dir):
            digest = sha256_file(path)
            if key.startswith("blobs/") and (not _SHA256.match(path.name) or digest != path.name):
                report.problems.append(f"{key}: its bytes do not have the sha256 it is named by")
                continue
            present = target.head(key)
            already = present is not None and present.sha256 == digest
            if already and _verified(target, key, digest, scratch):
                report.already += 1
                continue
            target.put_file(key, path, digest)
            if not _verified(target, key, digest, scratch):
                report.problems.append(f"{key}: the stored object does not read back")
                continue
            report.copied += 1
            report.bytes_copied += path.stat().st_size
            progress(key)
    return report
