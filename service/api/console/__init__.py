"""The web console at /ui (docs/console.md): server-rendered pages over the tenant-scoped
queries of the API, signed in with an API key."""

from service.api.console.routes import router

__all__ = ["router"]
