"""The HTTP server under the API: limits on slow, idle and surplus connections, and
problem+json for the requests aiohttp's own parser refuses (DESIGN §5).

aiohttp's web server has a keep-alive timeout but no timeout for a request's line and
headers, and no cap on connections, so slow clients could hold every descriptor the
daemon has. Here:

* a connection whose request line and headers are not complete within
  `header_timeout` of its first byte (or of the connection) is closed;
* an idle connection is closed after `keepalive_timeout`;
* beyond `max_connections` open connections, a new one is answered 503
  (problem+json) and closed at once, so the connections already open keep working;
* a request the HTTP parser refuses (line or header too long, bad characters,
  negative Content-Length, ...) is answered problem+json, and neither logged with
  its bytes (they may carry a credential) nor answered with them.

The body's own timeout is the API's (`lmwatch.api`, `body_timeout`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from lmwatch.api import ApiError, problem_response
from lmwatch.logs import get_logger
from lmwatch.schemas import PROBLEM_JSON

log = get_logger("lmwatch.server")

_PARSER_DETAIL = {
    "LineTooLong": "the request line or a header is too long",
    "BadStatusLine": "the request line is malformed",
    "BadHttpMethod": "the request method is malformed",
    "InvalidURLError": "the request target is malformed",
    "InvalidHeader": "a header is malformed",
    "BadHttpMessage": "the request is malformed",
    "ContentLengthError": "the Content-Length does not match the body",
    "TransferEncodingError": "the Transfer-Encoding is malformed",
}


def _overloaded_response() -> bytes:
    body = json.dumps(
        {
            "type": "urn:lmwatch:problem:too-many-connections",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "too many open connections; try again later",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a header timeout, a connection cap and
    problem+json error pages."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._refused = False

    # --- connection cap -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open_connections >= guard.max_connections:
            self._refused = True
            guard.refused += 1
            assert isinstance(transport, asyncio.Transport)
            transport.write(_overloaded_response())
            transport.close()
            return
        guard.open_connections += 1
        self._counted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counted = False
            self._guard.open_connections -= 1
        self._cancel_header_timer()
        super().connection_lost(exc)

    # --- header timeout -------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self._loop.call_later(
                self._guard.header_timeout, self._headers_too_slow
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.info("slow-request-closed", peer=str(self.peername), note="headers not complete")
        self.force_close()

    def data_received(self, data: bytes) -> None:
        waiting = self._waiter is not None and not self._waiter.done()
        if waiting and not self._messages:
            self._arm_header_timer()  # the first bytes of the next request
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_header_timer()  # a complete request line and headers

    # --- error pages ----------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """problem+json instead of aiohttp's text page. The parser's message quotes
        the offending bytes (a header may be a credential): it is neither logged nor
        sent back; the exception's class says enough."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        name = type(exc).__name__ if exc is not None else ""
        if status >= 500:
            log.error("request-error", status=status, error=name or "unknown")
            detail = (
                "the request took too long"
                if status == 504
                else "internal error; see the daemon log"
            )
            kind = "timeout" if status == 504 else "internal"
        else:
            log.info("malformed-request", status=status, error=name or "unknown")
            detail = _PARSER_DETAIL.get(name, "the request is malformed")
            kind = "malformed-request"
        response = problem_response(ApiError(status, kind, detail))
        response.force_close()
        return response


class GuardedServer(Server):
    """aiohttp's low-level server, making GuardedRequestHandler connections."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.refused = 0

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, keepalive_timeout=keepalive_timeout, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections

    async def _make_server(self) -> Server:
        base = await super()._make_server()  # starts and freezes the application
        return GuardedServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout=self._header_timeout,
            max_connections=self._max_connections,
            **base._kwargs,
        )


def runner(
    app: web.Application,
    *,
    header_timeout: float = 10.0,
    keepalive_timeout: float = 15.0,
    max_connections: int = 100,
    lingering_time: float = 2.0,
    **kwargs: Any,
) -> GuardedAppRunner:
    """The runner to serve `app` with (then `web.TCPSite(runner, ..., backlog=...)`).

    `lingering_time`: how long the rest of an unread body is drained after an answer
    (a 408 for a body too slow, a 401 ...) before the connection is closed."""
    return GuardedAppRunner(
        app,
        lingering_time=lingering_time,
        header_timeout=header_timeout,
        keepalive_timeout=keepalive_timeout,
        max_connections=max_connections,
        **kwargs,
    )
