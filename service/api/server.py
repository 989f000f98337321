"""Running the gateway under uvicorn with the limits at the edge (docs/security.md).

uvicorn's default HTTP implementation (httptools, when installed) buffers request headers
without any bound: a 100 MiB header was read for 16 s while other clients waited. `run` forces
uvicorn's h11 implementation, which refuses a request whose line and headers exceed
`max_header_bytes` as soon as that much is buffered; `HeaderLimitedH11Protocol` also measures
requests that arrived whole in one read, and answers both 431 (uvicorn's own h11 code says 400
to every parse error) and closes the connection.
"""

from __future__ import annotations

from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings, get_settings

APP = "service.api.app:create_app"
HEADERS_TOO_LARGE = 431


def _head_size(request: h11.Request) -> int:
    """The bytes of the request line and headers as sent (h11 drops only whitespace)."""
    line = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class HeaderLimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering 431 when the request line and headers overflow h11's
    buffer limit (`h11_max_incomplete_event_size`), 400 for other parse errors as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error_status = 400
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        next_event = self.conn.next_event

        def checked_next_event() -> Any:
            try:
                event = next_event()
                # h11 bounds only a buffer still waiting for the end of the headers: a whole
                # request that came in one read (up to 256 KiB) would pass. Measure it too.
                if isinstance(event, h11.Request) and _head_size(event) > limit:
                    raise h11.RemoteProtocolError(
                        "Request header fields too large", error_status_hint=HEADERS_TOO_LARGE
                    )
                return event
            except h11.RemoteProtocolError as exc:
                self._error_status = exc.error_status_hint
                raise

        self.conn.next_event = checked_next_event  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        if self._error_status != HEADERS_TOO_LARGE:
            super().send_400_response(msg)
            return
        body = b"Request header fields too large."
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        reason = b"Request Header Fields Too Large"
        self.transport.write(
            self.conn.send(h11.Response(status_code=431, headers=headers, reason=reason))
        )
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def uvicorn_options(settings: Settings | None = None) -> dict[str, Any]:
    """The uvicorn.run / uvicorn.Config keyword arguments that enforce the edge limits."""
    settings = settings or get_settings()
    return {
        "http": HeaderLimitedH11Protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }


def run(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """`tightrope serve`: the app factory under uvicorn with the header limit."""
    import uvicorn

    uvicorn.run(APP, factory=True, host=host, port=port, log_level=log_level, **uvicorn_options())


if __name__ == "__main__":  # python -m service.api.server HOST PORT (tests)
    import sys

    run(sys.argv[1], int(sys.argv[2]), log_level="warning")
