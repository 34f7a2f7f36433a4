"""The HTTP layer against slow, idle, surplus and malformed clients (issue 10): a real
server on 127.0.0.1, spoken to with raw sockets so that nothing is tidied on the way."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from apitools import TOKEN
from jsonschema import Draft202012Validator

from lmwatch import server
from lmwatch.api import create_app
from lmwatch.engine import Engine
from lmwatch.metrics import Metrics
from lmwatch.profiles import ProfileRegistry
from lmwatch.schemas import PROBLEM_JSON, openapi_document

SECRET = "s3cr3t-credential"


@dataclass
class Served:
    port: int
    guard: server.GuardedServer


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith(PROBLEM_JSON), self
        data: dict[str, Any] = json.loads(self.body)
        schema = {
            "$ref": "#/components/schemas/Problem",
            "components": openapi_document()["components"],
        }
        Draft202012Validator(schema).validate(data)
        assert data["status"] == self.status
        return data


async def _serve(
    engine: Engine, registry: ProfileRegistry, metrics: Metrics, **limits: Any
) -> AsyncIterator[Served]:
    body_timeout = limits.pop("body_timeout", 30.0)
    app = create_app(engine, registry, metrics, TOKEN, body_timeout=body_timeout)
    runner = server.runner(app, access_log=None, **limits)
    await runner.setup()
    from aiohttp import web

    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=16)
    await site.start()
    port = int(runner.addresses[0][1])
    assert isinstance(runner.server, server.GuardedServer)
    try:
        yield Served(port, runner.server)
    finally:
        await runner.cleanup()


@pytest.fixture
async def served(
    engine: Engine, registry: ProfileRegistry, metrics: Metrics
) -> AsyncIterator[Served]:
    async for one in _serve(
        engine,
        registry,
        metrics,
        header_timeout=1.5,
        keepalive_timeout=1.0,
        max_connections=8,
        body_timeout=1.0,
    ):
        yield one


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> Reply:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body)


async def _exchange(port: int, request: bytes) -> Reply:
    reader, writer = await _connect(port)
    try:
        writer.write(request)
        await writer.drain()
        return await _read_reply(reader)
    finally:
        writer.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closes the connection (fails after `seconds`)."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                break
            if not data:
                break
    return time.monotonic() - started


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def _post(path: str, body: bytes, headers: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


# --- slow and idle clients ------------------------------------------------------------


async def test_headers_sent_a_byte_at_a_time_are_cut_off(served: Served) -> None:
    reader, writer = await _connect(served.port)
    request = _get("/healthz")
    started = time.monotonic()
    closed = False
    for byte in request[:-4]:  # never complete the headers
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        try:
            async with asyncio.timeout(0.3):
                if not await reader.read(1):
                    closed = True
                    break
        except TimeoutError:
            pass
        except ConnectionError:
            closed = True
            break
        if time.monotonic() - started > 6:
            break
    writer.close()
    assert closed, "a client trickling its headers kept the connection"
    assert time.monotonic() - started < 4  # header timeout 1.5 s


async def test_a_connection_that_never_sends_is_closed(served: Served) -> None:
    reader, writer = await _connect(served.port)
    assert await _closed_within(reader, 4.0) < 4.0
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(served: Served) -> None:
    reader, writer = await _connect(served.port)
    writer.write(_get("/healthz"))
    assert (await _read_reply(reader)).status == 200
    assert await _closed_within(reader, 4.0) < 4.0  # keep-alive timeout 1 s
    writer.close()
    await asyncio.sleep(0.1)
    assert served.guard.open_connections == 0


async def test_a_body_that_does_not_arrive_is_answered_408(served: Served) -> None:
    reader, writer = await _connect(served.port)
    head = (
        f"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    writer.write(head.encode() + b'{"inst')
    reply = await _read_reply(reader, timeout=4.0)
    assert reply.status == 408
    assert reply.problem()["type"] == "urn:lmwatch:problem:body-timeout"
    assert await _closed_within(reader, 4.0) < 4.0  # after lingering 2 s at most
    writer.close()


async def test_beyond_the_cap_new_connections_are_refused_and_open_ones_keep_working(
    engine: Engine, registry: ProfileRegistry, metrics: Metrics
) -> None:
    async for served in _serve(
        engine, registry, metrics, header_timeout=30, keepalive_timeout=30, max_connections=8
    ):
        held = [await _connect(served.port) for _ in range(8)]
        for reader, writer in held:  # every slot taken and answering
            writer.write(_get("/healthz"))
            assert (await _read_reply(reader)).status == 200
        started = time.monotonic()
        reader, writer = await _connect(served.port)
        refused = await _read_reply(reader, timeout=2.0)
        assert refused.status == 503
        assert refused.problem()["type"] == "urn:lmwatch:problem:too-many-connections"
        assert await _closed_within(reader, 2.0) < 2.0
        assert time.monotonic() - started < 2.0
        writer.close()
        reader, writer = held[0]
        writer.write(_get("/healthz"))
        assert (await _read_reply(reader)).status == 200
        assert served.guard.refused == 1
        # A slot given back is free again.
        held.pop()[1].close()
        await asyncio.sleep(0.2)
        assert (await _exchange(served.port, _get("/healthz"))).status == 200
        for _, writer in held:
            writer.close()


# --- malformed requests: problem+json, never 500, credentials never echoed -----------


async def test_an_integer_beyond_the_digit_limit_is_400(served: Served) -> None:
    body = b'{"instance": "quiet", "source": "a", "destination": "b", "labels": ' + (
        b"1" * 5000 + b"}"
    )
    reply = await _exchange(served.port, _post("/v1/migrations", body))
    assert reply.status == 400, reply
    assert "number" in reply.problem()["detail"]


@pytest.mark.parametrize("depth", [1001, 100_000])
async def test_json_nested_too_deep_is_400(served: Served, depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    reply = await _exchange(served.port, _post("/v1/migrations", body))
    assert reply.status == 400, reply
    reply.problem()


async def test_a_body_over_the_limit_is_413(served: Served) -> None:
    body = b'{"instance": "' + b"x" * (1024**2 + 10) + b'"}'
    reply = await _exchange(served.port, _post("/v1/migrations", body))
    assert reply.status == 413, reply
    reply.problem()


@pytest.mark.parametrize("header", ["Authorization", "Idempotency-Key", "X-Anything"])
async def test_non_utf8_header_bytes_are_400_and_never_logged(
    served: Served, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    value = b"Bearer \xff\xfe" + SECRET.encode() if header == "Authorization" else b"\xff\xfe"
    value += SECRET.encode()
    request = (
        f"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n".encode()
    )
    if header == "Authorization":
        request = request.replace(f"Bearer {TOKEN}".encode(), value)
    else:
        request += header.encode() + b": " + value + b"\r\n"
    reply = await _exchange(served.port, request + b"\r\n{}")
    assert reply.status == 400, reply
    problem = reply.problem()
    assert SECRET not in problem["detail"]
    assert SECRET not in reply.body.decode("utf-8", "replace")
    assert SECRET not in caplog.text
    assert TOKEN not in caplog.text


async def test_a_non_ascii_idempotency_key_is_422(served: Served) -> None:
    body = json.dumps({"instance": "quiet", "source": "a", "destination": "b"}).encode()
    reply = await _exchange(
        served.port, _post("/v1/migrations", body, "Idempotency-Key: ключ\r\n".encode())
    )
    assert reply.status == 422, reply
    assert reply.problem()["errors"][0]["loc"] == ["header", "Idempotency-Key"]


@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        ("long URL", _get("/v1/migrations/" + "a" * 20_000)),
        ("long header", _get("/healthz", "X-Long: " + "a" * 20_000 + "\r\n")),
        ("control character in the path", b"GET /v1/mig\x01rations HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("space in the path", b"GET /v1/mig rations HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("non-UTF-8 path", b"GET /v1/migrations/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("non-UTF-8 percent-encoded path", _get("/v1/migrations/%ff%fe")),
        (
            "negative Content-Length",
            b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        ),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        ("bad header name", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n"),
    ],
)
async def test_malformed_requests_are_problem_json_not_500(
    served: Served, name: str, request_bytes: bytes
) -> None:
    reply = await _exchange(served.port, request_bytes)
    assert 400 <= reply.status < 500, (name, reply)
    reply.problem()


async def test_a_labels_query_with_a_blank_key_is_422(served: Served) -> None:
    reply = await _exchange(served.port, _get("/v1/instances/quiet/profile?labels=%20%3Dv"))
    assert reply.status == 422, reply
    assert reply.problem()["errors"][0]["loc"] == ["query", "labels"]


# --- the daemon serves with its settings ----------------------------------------------


def test_the_limits_have_defaults() -> None:
    from lmwatch.config import Settings

    settings = Settings()
    assert settings.http_header_timeout == 10.0
    assert settings.http_body_timeout == 30.0
    assert settings.http_keepalive_timeout == 15.0
    assert settings.http_max_connections == 100
    assert settings.http_backlog == 128


async def test_the_daemon_serves_with_its_limits(tmp_path: Path) -> None:
    from lmwatch import daemon
    from lmwatch.config import Settings

    settings = Settings(
        port=0,
        store_path=tmp_path / "lmwatch.db",
        token=TOKEN,
        http_max_connections=2,
        http_header_timeout=1.0,
        http_keepalive_timeout=30,
    )
    ready: asyncio.Queue[list[tuple[str, int]]] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(
        daemon.run(settings, stop=stop, on_ready=ready.put_nowait, handle_signals=False)
    )
    try:
        _, port = (await asyncio.wait_for(ready.get(), 30))[0]
        held = [await _connect(port) for _ in range(2)]
        for reader, writer in held:
            writer.write(_get("/healthz"))
            assert (await _read_reply(reader)).status == 200
        assert (await _exchange(port, _get("/healthz"))).status == 503
        for _, other in held:
            other.close()
        await asyncio.sleep(0.2)
        quiet, silent = await _connect(port)  # a slot again; no request: header timeout
        assert await _closed_within(quiet, 4.0) < 4.0
        silent.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
