"""A faithful re-implementation of robust-nets' worst-case search, in this project's terms.

robust-nets (Genzel, Macdonald, März: "Solving inverse problems with deep neural networks -
robustness included?", github.com/jmaces/robust-nets) attacks its networks with `grid_attack`
(ellipses/find_adversarial.py) and the settings of `_attackerNet`
(ellipses/config_robustness_fourier.py) and ellipses/script_robustness_fourier_table_adv.py.
What this module reproduces, per image:

- levels δ searched from the largest down; each a ball ‖e‖ ≤ δ‖y‖ around the measurements;
- 6 restarts; the 3 with the largest error seed the next (smaller) level as they are, not
  rescaled: their first step starts outside the new ball;
- fresh restarts start at e = 3δ‖y‖/√M · N(0, I) (M: measured real entries, 2 × the complex
  measurements), about three times the radius, and are NOT projected before the first step;
- their `PAdam`: torch.optim.Adam (eps 1e-5, default betas) on −‖Ψ(y+e) − x‖² (summed), then
  projection onto the ball, for a fixed number of iterations (1,000 in their table), with one
  extra forward per iteration for the progress bar; the LAST iterate is kept, not the best;
- the error of a restart is measured once at the end; per image the largest over restarts.

Their learning rate is 5 in their units, where every Adam step is hundreds of radii long, so
each iterate lands on the ball's boundary. Here the rate is converted with the typical size of
one measured entry, ‖y‖/√M: theirs is about THEIR_ENTRY_RMS on 256×256 ellipse phantoms under
40 golden-angle radial spokes with the orthonormal FFT (estimated from their data generator's
parameters: 0.27 to 0.53 over 40 phantoms, mean 0.35), so the ratio step / radius at a level is
the same as theirs.

Differences kept on purpose (see the module's callers): the objective and the error are this
project's ‖Ψ(y+e) − x‖ (robust-nets compares complex magnitudes |Ψ(y+e)| and |x|; equal for
real non-negative outputs), and restarts run in one batch (theirs: batches of 3; Adam is
element-wise, so the iterates are the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.attacks import per_sample_norm
from workers.engine.context import Operator, Subject

THEIR_LR = 5.0  # config_robustness_fourier.py, "stepsize": 5e0
THEIR_ADAM_EPS = 1e-5  # find_adversarial.py, PAdam: torch.optim.Adam(..., eps=1e-5)
THEIR_ENTRY_RMS = 0.35  # ‖y‖/√M of their measurements (estimated, see the module's doc)
THEIR_INIT_FACTOR = 3.0  # adv_init_fac = 3.0 * noise_level
THEIR_LEVELS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08)  # table_adv.py (0.0 is not attacked)
THEIR_ITERATIONS = 1000


@dataclass
class RobustNetsOutcome:
    """Per level (in the order asked for) and image: the error, the worst restart's e."""

    levels: list[float]
    errors: torch.Tensor  # [L, B] relative error ‖Ψ(y+e) − x‖ / ‖x‖, max over restarts
    perturbations: torch.Tensor  # [L, B, *measurement]: the worst restart's e
    lr: float
    forward: int = 0  # passes through Ψ, one per sample per call
    backward: int = 0
    passes_per_level: list[tuple[int, int]] = field(default_factory=list)  # (forward, backward)


def their_lr(operator: Operator, y: torch.Tensor) -> float:
    """Their step (5) in this problem's units: one constant for all images and levels, as
    theirs, scaled by the typical size of one measured entry."""
    measured = float(operator.project(torch.ones_like(y[:1])).sum())
    entry_rms = float((operator.norm(y) / measured**0.5).mean())
    return THEIR_LR * entry_rms / THEIR_ENTRY_RMS


def robust_nets_search(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    levels: Sequence[float],
    iterations: int,
    restarts: int = 6,
    keep: int = 3,
    seed: int = 0,
    lr: float | None = None,
    batch: int | None = None,
    progress_forward: bool = True,
) -> RobustNetsOutcome:
    """robust-nets' search on images x [B, C, H, W] with measurements y = A x [B, ...].

    `batch`: rows (restart × image) per Adam run, all by default (theirs: 3; the iterates do
    not depend on it). `progress_forward`: their extra forward per iteration (counted)."""
    if keep > restarts:
        raise ValueError("keep must not exceed restarts")
    b = y.shape[0]
    generator = torch.Generator().manual_seed(seed)
    measured = float(operator.project(torch.ones_like(y[:1])).sum())
    y_norm = operator.norm(y).detach()
    x_norm = per_sample_norm(x).detach()
    lr = their_lr(operator, y) if lr is None else lr
    outcome = RobustNetsOutcome(
        levels=list(levels),
        errors=torch.zeros(len(levels), b),
        perturbations=torch.zeros(len(levels), *y.shape, dtype=y.dtype),
        lr=lr,
    )

    # rows are restart-major: row = restart * B + image
    y_all = y.detach().repeat(restarts, *([1] * (y.dim() - 1)))
    x_all = x.detach().repeat(restarts, *([1] * (x.dim() - 1)))
    x_norm_all = x_norm.repeat(restarts)
    carried: torch.Tensor | None = None  # [keep, B, ...]: the previous level's worst restarts
    for level in sorted(set(levels), reverse=True):  # find_adversarial.py: reversed(range(..))
        radius = (level * y_norm).repeat(restarts)
        # their start: y0 + 3·δ‖y0‖/√M · randn, drawn for every restart, then the carried ones
        # overwrite the first `keep` (config_robustness_fourier.py, _attackerNet)
        noise = torch.randn((restarts * b, *y.shape[1:]), generator=generator, dtype=y.dtype)
        noise = operator.project(noise.to(y.device))
        start = noise * _per_sample(THEIR_INIT_FACTOR * radius / measured**0.5, noise)
        if carried is not None:
            start = start.view(restarts, b, *y.shape[1:]).clone()
            start[:keep] = carried
            start = start.flatten(0, 1)
        passes_before = (outcome.forward, outcome.backward)
        step = batch or len(start)
        e = torch.cat(
            [
                _padam(
                    subject,
                    operator,
                    y_all[i : i + step],
                    x_all[i : i + step],
                    start[i : i + step],
                    radius[i : i + step],
                    iterations,
                    lr,
                    progress_forward,
                    outcome,
                )
                for i in range(0, len(start), step)
            ]
        )
        with torch.no_grad():
            # grid_attack: the error of the final iterate of each restart, one forward each
            error = per_sample_norm(subject.reconstruct(y_all + e) - x_all) / x_norm_all
            outcome.forward += len(e)
        error = error.view(restarts, b)
        order = error.argsort(dim=0, descending=True)  # [R, B], worst restart first
        images = torch.arange(b, device=error.device)
        by_restart = e.view(restarts, b, *y.shape[1:])
        carried = torch.stack([by_restart[order[k], images] for k in range(keep)])
        for index, asked in enumerate(levels):
            if asked == level:
                outcome.errors[index] = error[order[0], images].detach().cpu()
                outcome.perturbations[index] = by_restart[order[0], images].detach().cpu()
        outcome.passes_per_level.append(
            (outcome.forward - passes_before[0], outcome.backward - passes_before[1])
        )
    outcome.passes_per_level = _in_asked_order(outcome.passes_per_level, levels)
    return outcome


def _padam(
    subject: Subject,
    operator: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    start: torch.Tensor,
    radius: torch.Tensor,
    iterations: int,
    lr: float,
    progress_forward: bool,
    outcome: RobustNetsOutcome,
) -> torch.Tensor:
    """Their projected Adam on one batch of rows: step, project, (progress forward)."""
    e = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([e], lr=lr, eps=THEIR_ADAM_EPS)
    with torch.enable_grad():
        for _ in range(iterations):
            optimizer.zero_grad()
            # codomain_dist = MSELoss(reduction="sum"), untargeted: minimise its negative
            loss = -(subject.reconstruct(y + e) - x).pow(2).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                # their vector holds only measured entries: project onto them, then the ball
                projected = operator.project(e)
                shrink = (radius / operator.norm(projected).clamp_min(1e-30)).clamp(max=1.0)
                e.copy_(projected * _per_sample(shrink, projected))
                if progress_forward:  # post_loss for tqdm's display; its value is unused
                    subject.reconstruct(y + e)
            outcome.forward += len(e) * (2 if progress_forward else 1)
            outcome.backward += len(e)
            subject.counter.backward += len(e)  # the subject counts its forwards itself
    return e.detach()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _in_asked_order(
    per_level: list[tuple[int, int]], levels: Sequence[float]
) -> list[tuple[int, int]]:
    searched = sorted(set(levels), reverse=True)
    return [per_level[searched.index(level)] for level in levels]
