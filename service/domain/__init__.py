"""The rules of the API's resources, the one home that the route modules
(service/api/audit_routes.py, model_routes.py, dataset_routes.py) and the console
(service/api/console/) both call: ownership lookups, what a submission must satisfy
(audit_rules), the rows an upload makes (resource_rules), quotas, cancelling, where a report or
an artifact lies, and the page tokens of a list (pagination).

Nothing here speaks HTTP: no router, no request, no response object, and no import of
service.api (tests/test_layers.py). The rules take a session and the tenant and raise the domain
errors of service.domain.errors; the caller turns those into a problem document (the API,
service/api/problems.py) or an error page (the console). Status changes go through
service.db.lifecycle, as everywhere else."""
