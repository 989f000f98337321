"""report.html, the self-contained page people read (html.py, figures.py, templates/), rendered
by the workers' finalising step (workers.execution.finalise) and the local CLI. Torch-free.

It lives in workers/, not beside the rest of the report code in service.reports (findings,
JUnit, signatures: what the gateway needs too), because it draws with the engine's torch-free
helpers of workers.shared (the image panels the engine draws as well, the one array reader),
and no module of service/ imports workers/ (tests/test_layers.py)."""
