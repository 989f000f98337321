"""JSON against binary tensors: the endpoint client's time per request.

    .venv/bin/python benchmarks/oip_binary.py            # 30 requests per encoding
    .venv/bin/python benchmarks/oip_binary.py --requests 100 --batch 64 --size 64

Sends a batch of `--batch` images of 1×`size`×`size` (float32) as one infer request to the
project's own Open Inference Protocol server (tests/fixtures/oip_server.py) on loopback, whose
model is a cheap elementwise map (so the time is the encoding's, both ends, and the HTTP), with
the client's `binary="never"` (JSON tensors) and `binary="always"` (the binary tensor data
extension), alternating, after 3 warm-up requests each. Prints the median and p90 seconds per
request, the request and answer bodies' sizes, and the ratio. Both encodings' answers are
checked equal bit for bit. Exit status 0 (a measurement). Results: docs/benchmarks.md
("Query-only search against the white-box default").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.callback_targets import parse_allow_list  # noqa: E402
from schemas.endpoints import EndpointLimits, EndpointTarget  # noqa: E402
from tests.fixtures.oip_server import OIPServer  # noqa: E402
from workers.shared.inference_protocol import InferenceClient  # noqa: E402


def scaled(batch: np.ndarray) -> np.ndarray:
    return (batch * np.float32(0.5) + np.float32(0.25)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    shape = (1, args.size, args.size)
    x = np.random.default_rng(0).random((args.batch, *shape), dtype=np.float32)
    limits = EndpointLimits(max_batch=args.batch, requests_per_second=1000, concurrency=1)
    modes = {"never": "JSON", "always": "binary"}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    sizes: dict[str, tuple[int, int]] = {}
    answers: dict[str, np.ndarray] = {}
    with OIPServer(scaled, shape, shape) as server:
        target = EndpointTarget(
            url=server.url, model_name=server.name, input_name="input", output_name="output"
        )
        allow = parse_allow_list("127.0.0.1")
        clients = {
            mode: InferenceClient(target, limits=limits, allow=allow, binary=mode)  # type: ignore[arg-type]
            for mode in modes
        }
        try:
            for mode, client in clients.items():
                answered: list[int] = []
                client._http.event_hooks["response"] = [
                    lambda r, answered=answered: answered.append(int(r.headers["Content-Length"]))
                ]
                for _ in range(3):
                    answers[mode] = client.infer(x, expect=shape)
                sizes[mode] = (int(server.requests[-1].headers["Content-Length"]), answered[-1])
            for _ in range(args.requests):
                for mode, client in clients.items():
                    started = time.perf_counter()
                    client.infer(x, expect=shape)
                    seconds[mode].append(time.perf_counter() - started)
        finally:
            for client in clients.values():
                client.close()
    assert answers["never"].tobytes() == answers["always"].tobytes()
    print(f"a batch of {args.batch} × {list(shape)} float32, {args.requests} requests each")
    print("encoding  median ms  p90 ms  request bytes  answer bytes")
    medians = {}
    for mode, name in modes.items():
        values = sorted(seconds[mode])
        medians[mode] = statistics.median(values)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        request, answer = sizes[mode]
        print(
            f"{name:8s}  {medians[mode] * 1e3:9.1f}  {p90 * 1e3:6.1f}  {request:13d}  {answer:12d}"
        )
    print(f"JSON / binary (median): {medians['never'] / medians['always']:.1f}x")


if __name__ == "__main__":
    main()
