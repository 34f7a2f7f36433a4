"""What the daemon exposes beyond its own machine: HTTPS (tls_cert / tls_key), the
refusal to serve plain HTTP beyond loopback (allow_insecure)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from apitools import SMALL_PROFILES

from lmwatch import daemon
from lmwatch.config import Settings

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
    from lmwatch.config import ConfigError, load_settings

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
