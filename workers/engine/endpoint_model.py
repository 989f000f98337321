"""An endpoint model as the engine sees a model: a torch module, tensor in, tensor out, whose
every forward pass is a query to the vendor's endpoint (workers.shared.inference_protocol),
counted in the audit's query ledger.

It gives no gradients: a forward pass under autograd with an input that requires a gradient is
refused with the reason (the white-box searches cannot run; the query-only search,
workers.engine.query_search, can). The checks that only run forward passes (`random_noise`, the
random-placement `false_negative`) run on it unchanged. `scope` names the check and level the
next queries are charged to.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch

from workers.shared.errors import EngineInputError
from workers.shared.query_ledger import Scope


class QueryClient(Protocol):
    """What answers the module's queries: workers.shared.inference_protocol.InferenceClient,
    or a relay of it (docs/security.md, "Endpoints": the worker queries for the runner)."""

    def infer(
        self, inputs: np.ndarray, *, scope: Scope = ..., expect: Sequence[int] | None = ...
    ) -> np.ndarray: ...


class EndpointModule(torch.nn.Module):
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
