"""The rules of the API's resources, the one home that the routes (service/api/audits.py,
models.py, datasets.py) and the console (service/api/console/) both call: ownership lookups,
what a submission must satisfy, quotas, cancelling, where a report or an artifact lies.

Nothing here speaks HTTP: no router, no request, no response object. The rules take a session
and the tenant and raise the domain errors of service.api.problems; the caller turns those into
a problem document (the API) or an error page (the console)."""
