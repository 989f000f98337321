"""Moving a job's files into a warm spare's directory (workers/execution/warm_runner.py): a job
directory that a runner used before holds that runner's HOME scratch, as the spare's does."""

from __future__ import annotations

from pathlib import Path

from workers.execution.warm_runner import _move_contents


def _tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_a_used_job_directory_merges_into_the_spares_scratch(tmp_path: Path) -> None:
    job, spare = tmp_path / "job", tmp_path / "spare"
    (job / ".cache" / "matplotlib").mkdir(parents=True)
    (job / ".cache" / "matplotlib" / "fontlist.json").write_text("job's")
    (job / ".cache" / "torch").mkdir()
    (job / ".cache" / "torch" / "kernels").write_text("job's kernels")
    (job / ".config").mkdir()
    (job / "job.json").write_text("{}")
    (job / "out").mkdir()
    (job / "out" / "shard.json").write_text("[]")
    (spare / ".cache" / "matplotlib").mkdir(parents=True)
    (spare / ".cache" / "matplotlib" / "fontlist.json").write_text("spare's")
    (spare / ".config").write_text("a file where the job has a directory")

    _move_contents(job, spare)

    assert not job.exists()
    assert _tree(spare) == {
        ".cache/matplotlib/fontlist.json": "spare's",  # the spare may have it open: it stays
        ".cache/torch/kernels": "job's kernels",
        ".config": "a file where the job has a directory",
        "job.json": "{}",
        "out/shard.json": "[]",
    }


def test_a_fresh_job_directory_moves_whole(tmp_path: Path) -> None:
    job, spare = tmp_path / "job", tmp_path / "spare"
    (job / "inputs").mkdir(parents=True)
    (job / "inputs" / "model.pt").write_bytes(b"\x00\x01")
    (job / "job.json").write_text('{"kind": "plan"}')
    spare.mkdir()

    _move_contents(job, spare)

    assert not job.exists()
    assert (spare / "inputs" / "model.pt").read_bytes() == b"\x00\x01"
    assert (spare / "job.json").read_text() == '{"kind": "plan"}'
