"""Running the gateway under uvicorn with the limits at the edge (docs/security.md).

uvicorn's httptools implementation is the fastest it has (status polls: about twice the
requests per second of h11, and a far shorter tail under load, docs/benchmarks.md), but it
buffers request headers without any bound: a 100 MiB header was read for 16 s (httptools joins
the pieces of a header value by copying) while other clients waited.
`HeaderLimitedHttpToolsProtocol` counts the bytes of each request's line and headers as they
arrive and, past `max_header_bytes`, answers 431 and closes the connection at once; a request
that arrives whole in one read is measured exactly when its headers are parsed.

It also bounds slow clients (docs/security.md, "Slow clients"), which uvicorn leaves alone
once a request has begun (its keep-alive timer is cancelled by the first byte, and nothing
times the rest): a request's line and headers must arrive within `header_timeout` of its first
byte (of the connection's opening for a connection that has sent nothing), a body must keep a
minimum rate over each window, and one client address holds a bounded number of connections.
What it closes it answers (408, 429) when no response has begun, and counts in the log.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import logging
import resource
import time
from collections import Counter
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


def _plain_response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


_HEADER_TIMEOUT = _plain_response(b"408 Request Timeout", b"Request headers too slow.")
_BODY_TOO_SLOW = _plain_response(b"408 Request Timeout", b"Request body too slow.")
_TOO_MANY_CONNECTIONS = _plain_response(
    b"429 Too Many Requests", b"Too many connections from this address."
)

edge_log = logging.getLogger("tightrope.edge")


class EdgeLog:
    """Counts what the edge closes and logs it at most once per `interval` per reason: the
    first of a burst at once, then a summary, so thousands of slow sockets cost a few lines."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.pending: Counter[str] = Counter()
        self.addresses: dict[str, set[str]] = {}
        self.last_logged: dict[str, float] = {}
        self.total: Counter[str] = Counter()

    def closed(self, reason: str, address: str) -> None:
        self.total[reason] += 1
        now = time.monotonic()
        if now - self.last_logged.get(reason, -1e9) >= self.interval:
            self.last_logged[reason] = now
            extra = self.pending.pop(reason, 0)
            seen = self.addresses.pop(reason, set()) | {address}
            more = f" (and {extra} more since the last line)" if extra else ""
            edge_log.warning(
                "closed a connection from %s: %s%s; addresses: %s",
                address,
                reason,
                more,
                ", ".join(sorted(seen)[:8]),
            )
        else:
            self.pending[reason] += 1
            self.addresses.setdefault(reason, set()).add(address)


EDGE_LOG = EdgeLog()


class _HeadersTooLarge(Exception):
    """Raised from a parser callback: httptools hands it to uvicorn as a parse error."""


class HeaderLimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on the request line plus headers (size and
    time), on a body's rate, and on the connections of one client address."""

    # connections open per client address, in this process
    per_client: Counter[str] = Counter()

    def __init__(
        self,
        *args: Any,
        max_header_bytes: int,
        header_timeout: float = 10.0,
        body_window: float = 30.0,
        min_body_rate: int = 1024,
        max_connections_per_client: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.body_window = body_window
        self.min_body_rate = min_body_rate
        self.max_connections_per_client = max_connections_per_client
        self._in_head = True  # between the end of one request and the headers of the next
        self._head_bytes = 0  # received while in the head (at most one read too few)
        self._head_size = 0  # the parsed line and headers of this request, to the byte
        self._refused = False
        self._address = ""  # counted in per_client while not empty
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0  # of the current body, received in the current window

    # -- connections per client address -----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        if address and self.max_connections_per_client:
            if self.per_client[address] >= self.max_connections_per_client:
                EDGE_LOG.closed(
                    f"more than {self.max_connections_per_client} connections from one address",
                    address,
                )
                self._refused = True
                transport.write(_TOO_MANY_CONNECTIONS)
                transport.close()
                return
            self.per_client[address] += 1
            self._address = address
        self._arm_head_timer()  # a connection that never sends a byte is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._address:
            self.per_client[self._address] -= 1
            if self.per_client[self._address] <= 0:
                del self.per_client[self._address]
            self._address = ""
        super().connection_lost(exc)

    # -- time limits ------------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # the previous request is still being answered: the clock of the next head starts
            # when that answer is complete (uvicorn does not read on until then)
            self._arm_head_timer()
            return
        self._close_slow(_HEADER_TIMEOUT, f"headers not complete within {self.header_timeout:g} s")

    def _body_window_ended(self) -> None:
        self._body_timer = None
        if self._in_head or self.transport.is_closing():
            return
        received, self._body_bytes = self._body_bytes, 0
        if self.flow.read_paused or received >= self.min_body_rate * self.body_window:
            # reading paused: the app is behind, not the client
            self._body_timer = self.loop.call_later(self.body_window, self._body_window_ended)
            return
        started = self.cycle is not None and self.cycle.response_started
        self._close_slow(
            b"" if started else _BODY_TOO_SLOW,
            f"body slower than {self.min_body_rate} bytes/s over {self.body_window:g} s",
        )

    def _close_slow(self, response: bytes, reason: str) -> None:
        EDGE_LOG.closed(reason, self._address or (self.client[0] if self.client else "?"))
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()  # the app's receive() ends with a disconnect
        if response:
            self.transport.write(response)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
            self._arm_head_timer()  # from the first byte of a request's head
        else:
            self._body_bytes += len(data)
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
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_size + len(self.parser.get_method()) > self.max_header_bytes:
            self._refused = True
            raise _HeadersTooLarge  # uvicorn answers a parse error with send_400_response
        self._body_bytes = 0
        self._body_timer = self.loop.call_later(self.body_window, self._body_window_ended)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
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
            HeaderLimitedHttpToolsProtocol,
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout_seconds,
            body_window=settings.body_window_seconds,
            min_body_rate=settings.min_body_bytes_per_second,
            max_connections_per_client=per_client_cap(settings.max_connections_per_client),
        ),
    }


# files kept for what is not a client connection: the database, Redis, logs, imports
_RESERVED_FILES = 64


def per_client_cap(configured: int) -> int:
    """The connections one address may hold: the setting, but at most a quarter of the files
    left for connections, so that one address can never take them all (0: no bound)."""
    if configured == 0:
        return 0
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - _RESERVED_FILES) // 4))


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit (every connection is a file):
    (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


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
    before, after = raise_open_file_limit()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    edge_log.info(
        "open-file limit %d (was %d): at most about that many connections at once; "
        "headers within %g s, bodies at least %d bytes/s, %s connections per address",
        after,
        before,
        get_settings().header_timeout_seconds,
        get_settings().min_body_bytes_per_second,
        per_client_cap(get_settings().max_connections_per_client) or "unbounded",
    )

    options = uvicorn_options()  # after the open-file limit is raised: the caps depend on it
    uvicorn.run(
        APP,
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        workers=workers,
        **options,
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
