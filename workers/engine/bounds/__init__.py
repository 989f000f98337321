"""Certified upper bounds on what the checks measure (docs/theorem.md, "Certified upper bounds").

`certify_output_change(model, inputs)` bounds sup ‖Ψ(c + K e) − Ψ(c)‖₂ over ‖e‖_p ≤ ε (or its
ℓ∞ norm, `output="linf"`), `certify_lipschitz(model, inputs)` the local Lipschitz constant
sup ‖J_Ψ K‖₂ over the same set; both return `Unbounded` naming the first layer outside the
supported set. Pure torch, float64.
"""

from workers.engine.bounds.figure import Certificate, certify_output_change, spectral_norm_upper
from workers.engine.bounds.graph import Unbounded, trace
from workers.engine.bounds.inputs import InputSet, LinearMap, ball, box, through_linear_map
from workers.engine.bounds.lipschitz import certify_lipschitz, interval_jacobian
from workers.engine.bounds.propagate import Crown, LinearBounds, ibp

__all__ = [
    "Certificate",
    "Crown",
    "InputSet",
    "LinearBounds",
    "LinearMap",
    "Unbounded",
    "ball",
    "box",
    "certify_lipschitz",
    "certify_output_change",
    "ibp",
    "interval_jacobian",
    "spectral_norm_upper",
    "through_linear_map",
    "trace",
]
