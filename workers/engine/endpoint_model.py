"""An endpoint model as the engine sees a model: a torch module, tensor in, tensor out, whose
every forward pass is a query to the vendor's endpoint (workers.shared.inference_protocol),
counted in the audit's query ledger.

It gives no gradients: a forward pass under autograd with an input that requires a gradient is
refused with the reason (the white-box searches cannot run; the query-only search,
workers.engine.query_search, can). The checks that only run forward passes (`random_noise`,
`false_negative`'s `random` and `noise` searches) run on it unchanged. `scope` names the
check and level the next queries are charged to.

The process's query client is installed once (`install_query_client`: the sandboxed runner
installs the relay to the worker, tests a fake); `endpoint_module(spec)` is what
`workers.engine.model_loading.load_model` returns for the format `endpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Protocol

import numpy as np
import torch

from schemas.audits import AuditConfig
from schemas.endpoints import QUERY_ONLY_CHECKS
from schemas.model_spec import ModelSpec
from workers.shared.errors import EngineInputError
from workers.shared.query_ledger import Scope


class QueryClient(Protocol):
    """What answers the module's queries: workers.shared.inference_protocol.InferenceClient,
    or a relay of it (docs/security.md, "Endpoints": the worker queries for the runner)."""

    def infer(
        self, inputs: np.ndarray, *, scope: Scope = ..., expect: Sequence[int] | None = ...
    ) -> np.ndarray: ...


class EndpointModule(torch.nn.Module):
    # No gradients and no weights: the checks that look for it (`is_query_only`) search with
    # forward passes alone, and the audit refuses the checks that cannot.
    query_only = True

    def __init__(self, client: QueryClient, output_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.client = client
        self.output_shape = tuple(output_shape)
        self._scope: Scope = ("audit", None)

    @contextmanager
    def scope(self, check: str, level: float | None = None) -> Iterator[None]:
        """Charge the queries inside to (check, level)."""
        before = self._scope
        self._scope = (check, level)
        try:
            yield
        finally:
            self._scope = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise EngineInputError(
                "an endpoint model gives no gradients: only forward-only checks and the "
                "query-only search can audit it"
            )
        batch = x.detach().to("cpu", torch.float32).numpy()
        out = self.client.infer(
            np.ascontiguousarray(batch), scope=self._scope, expect=self.output_shape
        )
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


_installed: QueryClient | None = None


def install_query_client(client: QueryClient | None) -> None:
    """The client every endpoint model of this process queries through (None: none)."""
    global _installed
    _installed = client


def endpoint_module(spec: ModelSpec) -> EndpointModule:
    """The endpoint model of `spec`, querying the installed client: a reconstruction model
    answers `image_shape` per input, a classifier `[num_classes]` logits."""
    if _installed is None:
        raise EngineInputError(
            "the model is an endpoint model, but no query client is installed in this process: "
            "only a runner started for an endpoint job can query its endpoint"
        )
    if spec.task == "classification":
        assert spec.num_classes is not None  # the spec's validator requires it
        shape: tuple[int, ...] = (spec.num_classes,)
    else:
        shape = tuple(spec.image_shape)
    return EndpointModule(_installed, shape)


def is_query_only(model: Any) -> bool:
    """The model answers queries only (no gradients, no weights): an endpoint model."""
    return bool(getattr(model, "query_only", False))


def query_scope(model: Any, check: str, level: float | None = None) -> AbstractContextManager[None]:
    """Charge the model's queries inside to (check, level) when it is an endpoint model;
    nothing otherwise."""
    if isinstance(model, EndpointModule):
        return model.scope(check, level)
    return nullcontext()


def check_query_only_config(config: AuditConfig) -> None:
    """Raise EngineInputError naming the first check, or check option, that an endpoint model
    cannot run: every check outside QUERY_ONLY_CHECKS needs gradients or weights; of those in
    it, `worst_case` runs its query-only search (the ball formulation, no `certify`) and
    `false_negative` its forward-only searches (not `adversarial`)."""
    allowed = ", ".join(sorted(QUERY_ONLY_CHECKS))
    for check in config.checks:
        if check.kind not in QUERY_ONLY_CHECKS:
            raise EngineInputError(
                f"{check.kind} needs the model's gradients or weights; an endpoint model's audit "
                f"runs only: {allowed}"
            )
        problem = _query_only_option(check)
        if problem is not None:
            raise EngineInputError(f"{check.kind}: {problem}")


def _query_only_option(check: Any) -> str | None:
    if check.kind == "worst_case":
        if check.formulation != "ball":
            return (
                f"formulation {check.formulation!r} is not searched by queries: an endpoint "
                "model's worst case is searched in the ball formulation only"
            )
        if check.certify is not None:
            return "certify needs the model's weights (certified bounds): leave it out"
    if check.kind == "false_negative" and check.search == "adversarial":
        return (
            "search 'adversarial' needs the model's gradients: an endpoint model's "
            "false_negative runs search 'random' or 'noise'"
        )
    return None


@contextmanager
def level_scopes(model: Any, check: str) -> Iterator[Callable[[float], None]]:
    """Inside, the model's queries are charged to (check, None) until the callback it yields is
    called with a level: from then on to (check, level). Nothing for a model that is no
    endpoint model."""
    with ExitStack() as stack:
        stack.enter_context(query_scope(model, check))

        def on_level(level: float) -> None:
            stack.enter_context(query_scope(model, check, level))

        yield on_level
