"""Job directories a worker keeps between the shards of one audit.

Materialising a job directory (copying the model from the blob store, copying and localising
the audit's datasets, writing job.json) is done once per audit and worker process, not once per
shard. An entry is keyed by the audit and the model's sha256 and reused only while the model
copy still hashes to that sha256: the sandboxed child may write into its job directory, so a
copy it changed is thrown away and made again. The cache holds at most
`worker_job_cache_entries` directories (least recently used removed first); 0 keeps none.

It also keeps at most one runner child alive: the one that ran this worker's last shard, idle
with its model loaded, which runs the next shard of the same audit when told (`--serve`).
Shards of one audit may so share a process (the model's own audit only). The runner ends with
its audit: it is kept only while the audit has shards waiting, and ended when the worker starts
any other runner (another audit's shard, a plan, a finalising step, an admission), after
`runner_idle_seconds` without a next shard, and at once when its shard failed, timed out, hung
or was stopped. A worker so never holds two loaded models at once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from sqlalchemy.orm import Session

from service.db.tables import Audit, Model
from service.settings import Settings
from workers.execution import job_dirs
from workers.sandbox.child import RunnerChild

log = logging.getLogger(__name__)


class JobDirCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], Path] = OrderedDict()
        # At most one runner child kept alive (its model loaded), for the newest entry.
        self._child: tuple[Path, RunnerChild] | None = None
        # The kept child's idle timer runs in a thread of its own: the lock keeps it from ending
        # a child the worker is handing its next job.
        self._lock = threading.RLock()
        self._idle_timer: threading.Timer | None = None
        self._idle_token: object | None = None  # which keeping the running timer belongs to
        self.materialised = 0  # how many directories were built (tests and logs read it)
        self.children_started = 0  # how many kept children were handed over (tests read it)

    def kept_child(self, path: Path) -> RunnerChild | None:
        """The live child kept for this job directory, if any (its idle timer stopped: the
        caller runs its next job or ends it). A child kept for another job directory is ended:
        the caller is about to start a runner of its own."""
        with self._lock:
            self._stop_idle_timer()
            if self._child is None:
                return None
            if self._child[0] != path or not self._child[1].alive():
                self.drop_child()
                return None
            return self._child[1]

    def keep_child(
        self, path: Path, child: RunnerChild, *, idle_seconds: float | None = None
    ) -> None:
        """Keep `child` (idle, waiting for its next job) for the next shard of its audit; a
        child kept for another audit is ended: one loaded model per worker at a time. With
        `idle_seconds`, the child is ended when no next job came within that time."""
        with self._lock:
            self._stop_idle_timer()
            if self._child is not None and self._child[1] is not child:
                self.drop_child()
            if self._child is None:
                self.children_started += 1
            self._child = (path, child)
            if idle_seconds is not None:
                self._idle_token = token = object()
                timer = threading.Timer(idle_seconds, self._end_idle, args=(token,))
                timer.daemon = True
                timer.start()
                self._idle_timer = timer

    def drop_child(self, path: Path | None = None) -> None:
        """End the kept child (only the one of `path`, when given)."""
        with self._lock:
            if self._child is None or (path is not None and self._child[0] != path):
                return
            _, child = self._child
            self._child = None
            self._stop_idle_timer()
        child.kill()
        child.finish(grace_seconds=5.0)

    def _end_idle(self, token: object) -> None:
        with self._lock:
            if token is not self._idle_token or self._child is None:
                return  # handed a job meanwhile, or ended already
            path, child = self._child
            log.info("ending the idle runner %d of %s", child.pid, path.name)
            self._child = None
            self._idle_timer = self._idle_token = None
        child.kill()
        child.finish(grace_seconds=5.0)

    def _stop_idle_timer(self) -> None:
        self._idle_token = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def __len__(self) -> int:
        return len(self._entries)

    def job_dir(
        self, session: Session, settings: Settings, audit: Audit, model: Model, owner_tag: str
    ) -> Path:
        """A `shards` job directory for this audit, reused when it is kept and intact."""
        key = (audit.id, model.sha256)
        kept = self._entries.get(key)
        reference = job_dirs.reference_sha256(session, audit)
        if (
            kept is not None
            and kept.is_dir()
            and job_dirs.model_file_intact(kept, model.sha256, reference)
        ):
            self._entries.move_to_end(key)
            return kept
        if kept is not None:
            log.warning("audit %s: kept job directory changed; building it again", audit.id)
            self._drop(key)
        path = settings.jobs_dir / f"{audit.id}-shards-{owner_tag}"
        job_dirs.materialise_audit_job(session, settings, audit, model, kind="shards", job_dir=path)
        self.materialised += 1
        self._entries[key] = path
        self._evict()
        return path

    def moved(self, old: Path, new: Path) -> None:
        """The kept directory `old` now lives at `new` (a warm runner took its files)."""
        for key, kept in self._entries.items():
            if kept == old:
                self._entries[key] = new

    def release(self, path: Path) -> None:
        """After a shard: drop the directory at once when nothing is to be kept."""
        if self.capacity == 0:
            for key, kept in list(self._entries.items()):
                if kept == path:
                    self._drop(key)

    def forget_audit(self, audit_id: str) -> None:
        for key in [key for key in self._entries if key[0] == audit_id]:
            self._drop(key)

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _evict(self) -> None:
        while len(self._entries) > max(self.capacity, 1):
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, str]) -> None:
        path = self._entries.pop(key, None)
        if path is not None:
            self.drop_child(path)
            job_dirs.remove_job_dir(path)


_cache: JobDirCache | None = None


def worker_cache(settings: Settings) -> JobDirCache:
    """This worker process's kept job directories (and its kept runner)."""
    global _cache
    if _cache is None:
        _cache = JobDirCache(settings.worker_job_cache_entries)
    return _cache


def end_kept_runner() -> None:
    """End this worker process's kept runner, if any: called before the worker starts any
    other runner (a plan, a finalising step, an admission), so it never holds two."""
    if _cache is not None:
        _cache.drop_child()
