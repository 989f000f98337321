"""Reports people read: the self-contained report.html (html.py, figures.py, templates/) and
the worker's last step on a finished report (finalise.py: sign, render). Torch-free: the Celery
process and the local CLI both use it; the JUnit renderer and the signatures live in service/
(service.reports.junit, service.signing.reports) because the gateway needs them too."""
