"""The web console at /ui (docs/console.md): server-rendered pages over the tenant-scoped
queries of the API, signed in with an API key. Its routes are in
service.api.console.routes, which only the app factory (service.api.app) imports."""
