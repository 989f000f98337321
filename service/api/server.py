"""Running the gateway under uvicorn with the limits at the edge (docs/security.md).

uvicorn's httptools implementation is the fastest it has (status polls: about twice the
requests per second of h11, and a far shorter tail under load, docs/benchmarks.md), but it
buffers request headers without any bound: a 100 MiB header was read for 16 s (httptools joins
the pieces of a header value by copying) while other clients waited.
`HeaderLimitedHttpToolsProtocol` counts the bytes of each request's line and headers as they
arrive and, past `max_header_bytes`, answers 431 and closes the connection at once; a request
that arrives whole in one read is measured exactly when its headers are parsed.
"""

from __future__ import annotations

import functools
import gc
import importlib
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings, get_settings

APP = "service.api.app:create_app"
_TOO_LARGE_BODY = b"Request header fields too large."
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_TOO_LARGE_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _TOO_LARGE_BODY
)


class _HeadersTooLarge(Exception):
    """Raised from a parser callback: httptools hands it to uvicorn as a parse error."""


class HeaderLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on the request line plus headers."""

    def __init__(self, *args: Any, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self._in_head = True  # between the end of one request and the headers of the next
        self._head_bytes = 0  # received while in the head (at most one read too few)
        self._head_size = 0  # the parsed line and headers of this request, to the byte
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self._refused:
            self._refuse()  # still no end of the headers: do not buffer (or copy) any more

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = len(b"  HTTP/1.1\r\n") + len(b"\r\n")  # all but method, target, fields

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + len(b": \r\n")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_size + len(self.parser.get_method()) > self.max_header_bytes:
            self._refused = True
            raise _HeadersTooLarge  # uvicorn answers a parse error with send_400_response
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            self._refuse()
        else:
            super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refused:
            self._refuse()  # now, if that was the last request before the refused one

    def _refuse(self) -> None:
        """431 and close, once the requests that came before on this connection (kept alive or
        pipelined) are answered: their answers are not lost to this one's."""
        self._refused = True
        if self.transport.is_closing():
            return
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self.flow.pause_reading()
            return
        self.transport.write(_TOO_LARGE)
        self.transport.close()


def uvicorn_options(settings: Settings | None = None) -> dict[str, Any]:
    """The uvicorn.run / uvicorn.Config keyword arguments that enforce the edge limits."""
    settings = settings or get_settings()
    return {
        "http": functools.partial(
            HeaderLimitedHttpToolsProtocol, max_header_bytes=settings.max_header_bytes
        ),
    }


def run(
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
    workers: int = 1,
) -> None:
    """`tightrope serve`: the app factory under uvicorn with the header limit."""
    import uvicorn

    # What the imports built (modules, classes, schemas) lives as long as the process: out of
    # the collector's sight, a full collection no longer walks it (one took 96 ms).
    importlib.import_module(APP.split(":")[0])
    gc.collect()
    gc.freeze()

    uvicorn.run(
        APP,
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        workers=workers,
        **uvicorn_options(),
    )


if __name__ == "__main__":
    # python -m service.api.server HOST PORT [--no-access-log] [--workers N]: the tests and
    # benchmarks/poll_load.py start the gateway exactly as `tightrope serve` does.
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    run(
        args.host,
        args.port,
        log_level="warning",
        access_log=not args.no_access_log,
        workers=args.workers,
    )
