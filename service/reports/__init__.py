"""Report code the gateway and the workers share, torch-free: what each check found, in words
(findings), JUnit XML (junit, rendered by the gateway on request and by `tightrope gate`), and
the Ed25519 signatures of report.json (signatures: the workers sign, the gateway serves the
public key, the CLI verifies).

The rest of a report's life: its shape is schemas.reports; the engine builds report.json
(workers.engine.report); the workers' finalising step signs it and renders report.html
(workers.execution.finalise, with workers.reporting, which draws with workers.shared and so
stays in workers/)."""
