"""What the daemon exposes beyond its own machine: HTTPS (tls_cert / tls_key), the
refusal to serve plain HTTP beyond loopback (allow_insecure), and reads that need a
token (read_token)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from apitools import SMALL_PROFILES, Api, OpenApiChecker

from lmwatch import daemon
from lmwatch.api import READ_TOKEN as READ_TOKEN_KEY
from lmwatch.api import create_app
from lmwatch.config import ConfigError, Settings, load_settings
from lmwatch.engine import Engine
from lmwatch.metrics import Metrics
from lmwatch.profiles import ProfileRegistry

TOKEN = "exposure-test-token"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def settings_for(tmp_path: Path, **values: object) -> Settings:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES)
    base: dict[str, object] = {
        "port": 0,
        "store_path": tmp_path / "lmwatch.db",
        "profiles_path": profiles,
        "profile_check_interval": 3600,
        "token": TOKEN,
    }
    return Settings(**{**base, **values})


# --- TLS ------------------------------------------------------------------------------


async def test_the_daemon_serves_https_with_the_configured_certificate(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    settings = settings_for(tmp_path, tls_cert=cert, tls_key=key)
    stop = asyncio.Event()
    ready: asyncio.Queue[list[tuple[str, int]]] = asyncio.Queue()
    task = asyncio.create_task(
        daemon.run(settings, stop=stop, on_ready=ready.put_nowait, handle_signals=False)
    )
    try:
        host, port = (await asyncio.wait_for(ready.get(), 30))[0]
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://{host}:{port}/healthz", ssl=trusted) as response:
                assert response.status == 200
            headers = {"Authorization": f"Bearer {TOKEN}"}
            body = {"instance": "web-1", "source": "host-a", "destination": "host-b"}
            async with session.post(
                f"https://{host}:{port}/v1/migrations", json=body, headers=headers, ssl=trusted
            ) as response:
                assert response.status == 202, await response.text()
            # The certificate is checked: a client that does not trust it is refused...
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(f"https://{host}:{port}/healthz"):
                    pass
            # ...and plain HTTP gets no answer.
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://{host}:{port}/healthz") as response:
                    await response.read()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        load_settings(tls_cert=tmp_path / "cert.pem")


@pytest.mark.parametrize("broken", ["missing", "garbage"])
async def test_an_unusable_certificate_is_a_startup_error(
    tmp_path: Path, certificate: tuple[Path, Path], broken: str
) -> None:
    cert, key = certificate
    if broken == "missing":
        cert = tmp_path / "absent.pem"
        expected = "cannot read the TLS certificate or key"
    else:
        cert.write_text("not a certificate\n")
        expected = "invalid TLS certificate or key"
    settings = settings_for(tmp_path, tls_cert=cert, tls_key=key)
    with pytest.raises(daemon.StartupError, match=expected):
        await daemon.build(settings)


# --- binding beyond loopback --------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.0.2.10", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert daemon.is_loopback(host) is loopback


async def test_plain_http_beyond_loopback_is_refused(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, listen_host="0.0.0.0")
    with pytest.raises(daemon.StartupError) as caught:
        await daemon.build(settings)
    message = str(caught.value)
    assert "refusing to listen on 0.0.0.0" in message
    assert "clear text" in message
    assert "tls_cert and tls_key" in message and "allow_insecure" in message
    assert not (tmp_path / "lmwatch.db").exists()  # refused before anything was opened


def test_lmwatch_serve_beyond_loopback_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = {"host": "0.0.0.0", "port": 0, "store": str(tmp_path / "x.db"), "token": "t"}
    assert daemon.main(options) == daemon.EXIT_STARTUP
    assert "not a loopback address and no TLS is configured" in capsys.readouterr().err


def test_allow_insecure_starts_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, listen_host="0.0.0.0", allow_insecure=True)
    with caplog.at_level(logging.WARNING):
        daemon.check_exposure(settings)
    assert "insecure-listen" in caplog.text
    assert "reads-open" in caplog.text


def test_tls_beyond_loopback_is_accepted(
    tmp_path: Path, certificate: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = certificate
    settings = settings_for(tmp_path, listen_host="0.0.0.0", tls_cert=cert, tls_key=key)
    with caplog.at_level(logging.WARNING):
        daemon.check_exposure(settings)
    assert "insecure-listen" not in caplog.text
    assert daemon.tls_context(settings) is not None


def test_loopback_needs_no_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        daemon.check_exposure(settings_for(tmp_path))
    assert caplog.text == ""


# --- reads with a token ---------------------------------------------------------------

READ_TOKEN = "read-only-token-abcdef"
GUARDED_READS = [
    "/v1/migrations",
    "/v1/migrations/m-nonexistent",
    "/v1/profiles",
    "/v1/instances/quiet/profile",
    "/metrics",
]


@pytest.fixture
async def guarded(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    engine: Engine,
    registry: ProfileRegistry,
    metrics: Metrics,
    checker: OpenApiChecker,
) -> Api:
    app = create_app(engine, registry, metrics, TOKEN, read_token=READ_TOKEN)
    return Api(await aiohttp_client(app), TOKEN, checker)


@pytest.mark.parametrize("path", GUARDED_READS)
async def test_with_a_read_token_reads_need_a_token(guarded: Api, path: str) -> None:
    anonymous = await guarded.get(path, auth=False)
    assert anonymous.status == 401
    assert anonymous.body["detail"] == "a bearer token is required"
    assert "WWW-Authenticate" in anonymous.headers
    wrong = await guarded.get(path, auth="Bearer not-the-token")
    assert wrong.status == 401
    for token in (READ_TOKEN, TOKEN):
        answer = await guarded.get(path, auth=f"Bearer {token}")
        assert answer.status in (200, 404), answer.text  # 404: the unknown migration


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
async def test_health_readiness_and_the_api_description_stay_open(guarded: Api, path: str) -> None:
    assert (await guarded.get(path, auth=False)).status == 200


async def test_the_read_token_cannot_change_anything(guarded: Api, engine: Engine) -> None:
    body = {"instance": "quiet", "source": "a", "destination": "b"}
    refused = await guarded.post("/v1/migrations", body, auth=f"Bearer {READ_TOKEN}")
    assert refused.status == 403
    assert refused.body["detail"] == "the read token does not allow changes"
    assert (await guarded.get("/v1/migrations")).body["migrations"] == []
    accepted = await guarded.post("/v1/migrations", body)
    assert accepted.status == 202


async def test_without_a_read_token_reads_stay_open(api: Api) -> None:
    assert (await api.get("/v1/migrations", auth=False)).status == 200
    assert (await api.get("/metrics", auth=False)).status == 200


def test_read_token_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "read-token"
    path.write_text(READ_TOKEN + "\n")
    path.chmod(0o600)
    settings = settings_for(tmp_path, read_token_file=path)
    assert daemon.resolve_read_token(settings) == READ_TOKEN
    monkeypatch.setenv("LMWATCH_READ_TOKEN", "from-env")
    assert daemon.resolve_read_token(load_settings()) == "from-env"
    monkeypatch.delenv("LMWATCH_READ_TOKEN")
    assert daemon.resolve_read_token(settings_for(tmp_path)) is None
    path.chmod(0o604)
    with pytest.raises(daemon.StartupError, match=r"read token file .* readable by others"):
        daemon.resolve_read_token(settings)


def test_read_token_and_read_token_file_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="read_token or read_token_file"):
        load_settings(read_token="x", read_token_file=tmp_path / "f")


async def test_a_read_token_equal_to_the_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(daemon.StartupError, match="read_token is the same as token"):
        await daemon.build(settings_for(tmp_path, read_token=TOKEN))


async def test_the_daemon_guards_reads_with_its_read_token(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, read_token=READ_TOKEN)
    built = await daemon.build(settings)
    try:
        assert built.app[READ_TOKEN_KEY] == READ_TOKEN
    finally:
        await built.close()
