"""Many clients registering endpoint models at once (issue 24): wrk POSTing `POST
/v1/endpoint-models` (each registration encrypts its secret and sends the admission probe's
task) and, once one endpoint model is ready, `POST /v1/audits` naming it, against a real
gateway on 127.0.0.1 (benchmarks/poll_load.py's start-up: `tightrope serve` less the access
log, a fresh data directory, a real Redis broker).

    .venv/bin/python benchmarks/endpoint_registrations.py [--database-url URL] [--seconds 10]

Prints requests per second, p50/p99 and the non-2xx/3xx count of each run; 202 is the only
answer expected (no 500, no 503). Needs `wrk` (Debian package) and Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.poll_load import free_port, run_wrk, seed, start_gateway  # noqa: E402
from service.db.session import make_engine  # noqa: E402
from service.db.tables import Model  # noqa: E402

REGISTRATION = {
    "url": "https://models.example.com",
    "model_name": "denoiser",
    "spec": {
        "name": "vendor",
        "task": "reconstruction",
        "input": "measurement",
        "image_shape": [1, 8, 8],
    },
    "auth": {"header": "Authorization", "secret": "Bearer benchmark-secret"},
}


def post_wrk(url: str, secret: str, body: dict[str, Any], seconds: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    return run_wrk(url, headers, 64, 2, seconds, body=json.dumps(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        url = args.database_url or f"sqlite:///{data_dir / 'tightrope.db'}"
        secret, _, _ = seed(url)
        port = free_port()
        # a tenant may keep many audits queued: the quota is not what this measures
        env = {"TIGHTROPE_TENANT_MAX_QUEUED_AUDITS": "1000000"}
        server = start_gateway(data_dir, url, port, args.broker_url, 1, env)
        try:
            base = f"http://127.0.0.1:{port}"
            registrations = post_wrk(
                f"{base}/v1/endpoint-models", secret, REGISTRATION, args.seconds
            )
            print("POST /v1/endpoint-models", json.dumps(registrations))
            engine = make_engine(url)
            with Session(engine) as session:  # one of them, as a worker's probe would leave it
                model_id = session.scalars(
                    Model.__table__.select().with_only_columns(Model.id).limit(1)
                ).one()
                session.execute(update(Model).where(Model.id == model_id).values(status="ready"))
                session.commit()
            engine.dispose()
            audit = {
                "model_id": model_id,
                "dataset": {"builtin": "shepp_logan", "count": 1, "size": 8},
                "operator": {"kind": "denoising"},
                "checks": [{"kind": "worst_case", "levels": [0.01]}],
                "budget": {"queries": 20000},
            }
            audits = post_wrk(f"{base}/v1/audits", secret, audit, args.seconds)
            print("POST /v1/audits (endpoint model)", json.dumps(audits))
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
