"""The case study of docs/case-study.md: the seed paper's story (Antun et al., PNAS 2020;
"The troublesome kernel", arXiv:2001.01258) told with the reference model and the audit engine.

    .venv/bin/python examples/case_study.py          # a few minutes on a 2-core CPU

runs one audit of examples/reference/model.safetensors with examples/reference/case-study.json
(network and TV baseline, every check through the engine, as `tightrope audit` would), then
draws every figure of the case study into docs/case-study/*.png from the report and its
artifacts, writes the numbers to docs/case-study/summary.json and prints them. Checks of the
config that this engine does not have are left out, with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from train_reference_model import plot_loss  # examples/, beside this script

import workers.engine.checks  # noqa: F401 - registers the engine's checks
from schemas.audits import AuditConfig
from schemas.model_spec import ModelSpec
from workers.engine.baselines import build_baseline
from workers.engine.entry_points import run_audit
from workers.engine.ground_truth import load_images, scale_to_range
from workers.engine.lesions import Placement, lesion_image, support
from workers.engine.model_loading import load_model
from workers.engine.operators import LinearOperator, build_operator
from workers.engine.registry import CHECKS
from workers.engine.shards import derive_seed, shard_seed

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "examples" / "reference"
DPI = 120
SUBJECT_LABELS = {"model": "U-Net", "baseline": "TV baseline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REFERENCE / "case-study.json")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "case-study")
    parser.add_argument("--work", type=Path, default=ROOT / ".tightrope" / "case-study")
    parser.add_argument("--panel-level", type=float, default=0.03, help="δ of the image panels")
    parser.add_argument(
        "--reuse", action="store_true", help="draw from the last audit in --work, do not rerun it"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    spec = ModelSpec.model_validate(json.loads((REFERENCE / "spec.json").read_text()))
    config = _available_checks(json.loads(args.config.read_text()))
    report_path = args.work / "report.json"
    if args.reuse and report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        report = audit_in_process(
            REFERENCE / "model.safetensors", "safetensors", "reference", spec, config, args.work
        )
    study = Study(spec, config, report, args.work)
    args.figures.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {"model": report["model"]["sha256"], "config": _shown(args.config)}
    summary["clean_relative_error"] = study.clean_errors()
    summary["worst_case"] = study.error_curves(args.figures / "error-vs-level.png")
    for subject in study.subjects:
        study.worst_case_panels(subject, args.panel_level, args.figures)
    summary["lipschitz"] = study.lipschitz()
    summary["false_negative"] = study.false_negative(args.figures)
    summary["kernel"] = study.kernel(args.figures)
    plot_loss(REFERENCE / "loss.json", args.figures / "loss.png")
    (args.figures / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, report)


def _shown(path: Path) -> str:
    """A path as the summary records it: relative to the repository when inside it, so the
    committed summary names no machine's directories."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _available_checks(raw: dict[str, Any]) -> AuditConfig:
    kept = [check for check in raw["checks"] if check["kind"] in CHECKS]
    for check in raw["checks"]:
        if check["kind"] not in CHECKS:
            print(f"note: this engine has no {check['kind']!r} check yet; left out")
    return AuditConfig.model_validate({**raw, "checks": kept})


def audit_in_process(
    model_path: Path,
    model_format: str,
    model_id: str,
    spec: ModelSpec,
    config: AuditConfig,
    work: Path,
) -> dict[str, Any]:
    """The engine's audit of one model file into `work` (as `tightrope audit` runs it), with
    its progress printed."""
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()

    def progress(fraction: float, check: str | None, message: str | None) -> None:
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:6.1f} s] {fraction:4.0%} {check or ''} {message or ''}", flush=True)

    return run_audit(
        model_path,
        model_format,
        spec,
        config,
        out_dir=work,
        model_sha256=hashlib.sha256(model_path.read_bytes()).hexdigest(),
        model_id=model_id,
        on_progress=progress,
    )


class Study:
    """The audit's report and artifacts, plus the model, operator and baseline to redraw the
    images the report only names (clean reconstructions, the detail for each subject)."""

    def __init__(
        self, spec: ModelSpec, config: AuditConfig, report: dict[str, Any], work: Path
    ) -> None:
        self.spec, self.config, self.report, self.work = spec, config, report, work
        assert config.operator is not None
        self.operator: LinearOperator = build_operator(config.operator, spec.image_shape)
        model = load_model(REFERENCE / "model.safetensors", "safetensors", spec)
        reconstructors = {"model": lambda y: model(self.operator.A_adjoint(y))}
        if config.baseline is not None:
            reconstructors["baseline"] = build_baseline(config.baseline, self.operator)
        self.reconstruct = reconstructors
        self.subjects = list(reconstructors)
        self.images = scale_to_range(load_images(config.dataset), spec.value_range)

    def check(self, kind: str, subject: str) -> dict[str, Any] | None:
        return next(
            (c for c in self.report["checks"] if c["kind"] == kind and c["subject"] == subject),
            None,
        )

    def run(self, subject: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.reconstruct[subject](self.operator.A(x))

    def clean_errors(self) -> dict[str, float]:
        errors = {}
        for subject in self.subjects:
            out = self.run(subject, self.images)
            ratio = (out - self.images).flatten(1).norm(dim=1) / self.images.flatten(1).norm(dim=1)
            errors[subject] = float(ratio.mean())
        return errors

    def error_curves(self, path: Path) -> dict[str, Any]:
        """Relative error vs level: worst case, Gaussian noise of the worst case's norm, and the
        random_noise check's mean, for every subject."""
        figure = Figure(figsize=(6.4, 4.2), dpi=DPI)
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        colours = {"model": "tab:red", "baseline": "tab:blue"}
        curves: dict[str, Any] = {}
        for subject in self.subjects:
            worst = self.check("worst_case", subject)
            if worst is None:
                continue
            levels = [100 * row["level"] for row in worst["levels"]]
            attacked = [row["relative_error"]["mean"] for row in worst["levels"]]
            attacked_max = [row["relative_error"]["max"] for row in worst["levels"]]
            gaussian = [row["gaussian_relative_error"]["mean"] for row in worst["levels"]]
            label, colour = SUBJECT_LABELS[subject], colours[subject]
            ax.plot(levels, attacked, "o-", color=colour, label=f"{label}: worst case (mean)")
            ax.plot(
                levels, attacked_max, "^:", color=colour, ms=4, label=f"{label}: worst case (max)"
            )
            ax.plot(
                levels,
                gaussian,
                "s--",
                color=colour,
                ms=4,
                alpha=0.7,
                label=f"{label}: Gaussian, same norm",
            )
            ax.axhline(worst["clean_relative_error"]["mean"], color=colour, lw=0.6, alpha=0.5)
            curves[subject] = {
                "levels": [row["level"] for row in worst["levels"]],
                "worst_case_mean": attacked,
                "worst_case_max": attacked_max,
                "gaussian_same_norm_mean": gaussian,
                "verdict": worst["verdict"],
            }
            noise = self.check("random_noise", subject)
            if noise is not None:
                curves[subject]["random_noise_mean"] = [
                    row["relative_error"]["mean"] for row in noise["levels"]
                ]
        ax.set_xlabel("perturbation size ‖e‖ / ‖y‖ (%)")
        ax.set_ylabel("relative error ‖Ψ(y+e) − x‖ / ‖x‖")
        ax.set_title(
            "Worst-case vs Gaussian perturbations (thin lines: no perturbation)", fontsize=9
        )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path)
        return curves

    def worst_case_panels(self, subject: str, level: float, folder: Path) -> None:
        """original, clean reconstruction, perturbed reconstruction, their difference and the
        perturbation (seen through A*), for the worst image of `level`."""
        worst = self.check("worst_case", subject)
        if worst is None:
            return
        k = _nearest_level(worst["levels"], level)
        row = worst["levels"][k]
        index = row["worst_image"]["index"]
        prefix = f"{_check_index(self.report, 'worst_case', subject):02d}-{subject}"
        e = torch.from_numpy(np.load(self.work / f"c{prefix}-worst_case-level{k}-perturbation.npy"))
        attacked = np.load(self.work / f"c{prefix}-worst_case-level{k}-reconstruction.npy")[0]
        x = self.images[index : index + 1]
        y = self.operator.A(x)
        clean = self.run(subject, x)[0, 0].numpy()
        seen = self.operator.A_adjoint(e[None])[0, 0].numpy()
        size = float(self.operator.norm(e[None])[0] / self.operator.norm(y)[0])
        truth = x[0, 0].numpy()
        error = np.linalg.norm(attacked - truth) / np.linalg.norm(truth)
        clean_error = np.linalg.norm(clean - truth) / np.linalg.norm(truth)
        title = (
            f"{SUBJECT_LABELS[subject]}, image {index}: a perturbation of "
            f"{100 * size:.1f} % of ‖y‖ takes the relative error "
            f"from {clean_error:.3f} to {error:.3f}"
        )
        _panel_row(
            folder / f"worst-case-{subject}.png",
            [
                ("original x", truth, (0.0, 1.0)),
                ("Ψ(y)", clean, (0.0, 1.0)),
                ("Ψ(y + e)", attacked, (0.0, 1.0)),
                ("Ψ(y + e) − Ψ(y)", attacked - clean, "signed"),
                ("perturbation A*e", seen, "signed"),
            ],
            title,
        )

    def lipschitz(self) -> dict[str, Any]:
        found = {}
        for subject in self.subjects:
            check = self.check("lipschitz", subject)
            if check is not None:
                found[subject] = {k: v for k, v in check.items() if k not in ("warnings",)}
        return found

    def false_negative(self, folder: Path) -> dict[str, Any] | None:
        """Miss rates, and the placement the network recovers worst drawn for every subject."""
        index = _check_index(self.report, "false_negative", "model", default=-1)
        if index < 0:
            return None
        found: dict[str, Any] = {}
        for subject in self.subjects:
            check = self.check("false_negative", subject)
            if check is not None:
                found[subject] = {
                    "miss_rate": check["miss_rate"],
                    "recovery": check["recovery"],
                    "misses": check["misses"],
                    "trials": check["trials"],
                }
        rows = self.check("false_negative", "model")["per_placement"]  # type: ignore[index]
        worst = min(rows, key=lambda r: r["recovery"] if r["recovery"] is not None else -1e9)
        lesion_config = self.config.checks[index]
        seed = shard_seed(
            self.config.seed,
            lesion_config.seed,  # type: ignore[union-attr]
            _seed_key(self.report, "false_negative", index, worst["index"]),
        )
        pattern = support(lesion_config.lesion, derive_seed(seed, "lesion"))  # type: ignore[union-attr]
        lo, hi = self.spec.value_range
        z = lesion_image(
            pattern,
            Placement(worst["row"], worst["col"]),
            self.spec.image_shape,
            lesion_config.lesion.contrast * (hi - lo),  # type: ignore[union-attr]
            self.spec.complex,
        )[None]
        x = self.images[worst["index"] : worst["index"] + 1]
        rows_out = []
        for subject in self.subjects:
            with_detail = self.run(subject, x + z)
            without = self.run(subject, x)
            rho = float(((with_detail - without) * z).sum() / (z * z).sum())
            found.setdefault(subject, {})["shown_placement_recovery"] = rho
            rows_out.append(
                (subject, with_detail[0, 0].numpy(), (with_detail - without)[0, 0].numpy(), rho)
            )
        found["shown_placement"] = {k: worst[k] for k in ("index", "row", "col")}
        _detail_figure(folder / "detail.png", (x + z)[0, 0].numpy(), z[0, 0].numpy(), rows_out)
        self._copy_artifacts("false_negative", folder)
        return found

    def kernel(self, folder: Path) -> dict[str, Any] | None:
        check = self.check("kernel", "model")
        if check is None:
            return None
        self._copy_artifacts("kernel", folder)
        listed = check["certificates"][:3]
        return {
            "certificate_count": check["certificate_count"],
            "best_lower_bound": check["best_lower_bound"],
            "confirmation": check["confirmation"],
            "hallucination_returns": check["hallucination"]["returns"],
            "best_certificates": listed,
            "baseline": _kernel_brief(self.check("kernel", "baseline")),
        }

    def _copy_artifacts(self, kind: str, folder: Path) -> None:
        """The check's own panels (PNG artifacts), named <subject>-<artifact>.png."""
        for subject in self.subjects:
            check = self.check(kind, subject)
            for name in (check or {}).get("artifacts", []):
                if name.endswith(".png"):
                    shutil.copyfile(self.work / name, folder / name.split("-", 1)[1])


def _kernel_brief(check: dict[str, Any] | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {
        "certificate_count": check["certificate_count"],
        "best_lower_bound": check["best_lower_bound"],
    }


def _check_index(
    report: dict[str, Any], kind: str, subject: str, default: int | None = None
) -> int:
    kinds = [c["kind"] for c in report["config"]["checks"]]
    if kind not in kinds:
        if default is None:
            raise KeyError(kind)
        return default
    return kinds.index(kind)


def _seed_key(report: dict[str, Any], kind: str, check_index: int, image: int) -> str:
    """The shard seed key of the shard holding `image` (shards split the images evenly)."""
    from workers.engine.shards import plan_shards

    config = AuditConfig.model_validate(report["config"])
    for shard in plan_shards(config, int(config.dataset.count), ["model"]):  # type: ignore[union-attr]
        if shard.check_index == check_index and shard.start <= image < shard.stop:
            return shard.seed_key
    raise KeyError(image)


def _nearest_level(rows: list[dict[str, Any]], level: float) -> int:
    return min(range(len(rows)), key=lambda k: abs(rows[k]["level"] - level))


def _panel_row(path: Path, images: list[tuple[str, np.ndarray, Any]], title: str) -> None:
    figure = Figure(figsize=(2.3 * len(images), 2.7), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(images))
    for ax, (caption, image, scale) in zip(axes, images, strict=True):
        if scale == "signed":
            bound = float(np.abs(image).max()) or 1.0
            shown = ax.imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            shown = ax.imshow(image, cmap="gray", vmin=scale[0], vmax=scale[1])
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(caption, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def _detail_figure(
    path: Path,
    truth: np.ndarray,
    lesion: np.ndarray,
    rows: list[tuple[str, np.ndarray, np.ndarray, float]],
) -> None:
    """Per subject: x + z and Ψ(A(x + z)), then both zoomed on the detail, and the detail the
    subject recovered, Ψ(A(x + z)) − Ψ(Ax), on the detail's own colour scale."""
    rows_at, cols_at = np.nonzero(lesion)
    margin = 6
    zoom = (
        slice(max(0, rows_at.min() - margin), rows_at.max() + margin + 1),
        slice(max(0, cols_at.min() - margin), cols_at.max() + margin + 1),
    )
    figure = Figure(figsize=(11.0, 2.5 * len(rows)), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 5, squeeze=False)
    bound = float(np.abs(lesion).max()) or 1.0
    for r, (subject, out, recovered, rho) in enumerate(rows):
        name = SUBJECT_LABELS[subject]
        panels = [
            ("x + z (ground truth)", truth, "gray"),
            (f"{name}: Ψ(A(x + z))", out, "gray"),
            ("x + z, zoomed", truth[zoom], "gray"),
            (f"{name}, zoomed", out[zoom], "gray"),
            (f"recovered detail, ρ = {rho:.2f}", recovered[zoom], "signed"),
        ]
        for ax, (caption, image, scale) in zip(axes[r], panels, strict=True):
            if scale == "signed":
                ax.imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
            else:  # the detail may rise above the value range: show all of x + z
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=float(truth.max()))
            ax.set_title(caption, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(
        "A detail absent from the training set, exact measurements (e = 0); "
        "ρ = ⟨Ψ(A(x+z)) − Ψ(Ax), z⟩ / ‖z‖²",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path)


def _print_summary(summary: dict[str, Any], report: dict[str, Any]) -> None:
    print(f"\nverdict {report['verdict']}; audit wall time {report['cost']['wall_seconds']} s")
    for subject, value in summary["clean_relative_error"].items():
        print(f"clean relative error, {SUBJECT_LABELS[subject]}: {value:.4f}")
    for subject, curve in summary["worst_case"].items():
        print(f"\n{SUBJECT_LABELS[subject]}: level  worst(mean)  worst(max)  Gaussian(same norm)")
        for k, level in enumerate(curve["levels"]):
            print(
                f"  {100 * level:5.1f} %  {curve['worst_case_mean'][k]:10.4f}  "
                f"{curve['worst_case_max'][k]:10.4f}  {curve['gaussian_same_norm_mean'][k]:10.4f}"
            )
    for subject, lip in summary["lipschitz"].items():
        norm = lip["jacobian_norm"]
        print(
            f"‖J‖₂ by power iteration, {SUBJECT_LABELS[subject]}: mean {norm['mean']:.2f}, "
            f"max {norm['max']:.2f} ({lip['verdict']})"
        )
    if summary["false_negative"]:
        print(f"\nfalse_negative: {json.dumps(summary['false_negative'])}")
    if summary["kernel"]:
        print(f"\nkernel: {json.dumps(summary['kernel'])[:800]}")


if __name__ == "__main__":
    main()
