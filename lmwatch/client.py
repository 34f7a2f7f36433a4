"""A small client for lmwatch's HTTP API (used by the command-line interface).

Every call returns the decoded JSON body; an error answer (problem+json or not)
raises `ApiError` carrying the status, title and detail the daemon sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8787"


class ApiError(Exception):
    """The daemon answered with an error, or could not be reached (status 0)."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        self.status = status
        self.title = title
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.detail and self.detail != self.title:
            return f"{self.title}: {self.detail}" if self.title else self.detail
        return self.title or f"HTTP {self.status}"


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """The bearer token: --token, then --token-file, then $LMWATCH_TOKEN."""
    if token:
        return token
    if token_file:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip() or None
        except OSError as error:
            raise ApiError(
                0, f"cannot read token file {token_file}", error.strerror or ""
            ) from error
    return os.environ.get("LMWATCH_TOKEN") or None


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("LMWATCH_URL") or DEFAULT_URL).rstrip("/")


class Client:
    """Async API client; use as `async with Client(url, token) as client: ...`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._owns_session = True
        return self._session

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.base_url + path
        try:
            async with self._http().request(method, url, json=body, headers=headers) as response:
                text = await response.text()
                data = _decode(text)
                if response.status >= 400:
                    raise _error(response.status, response.reason or "", data, text)
                return data
        except aiohttp.ClientError as error:
            raise ApiError(0, f"cannot reach lmwatch at {self.base_url}", str(error)) from error
        except TimeoutError as error:
            raise ApiError(0, f"lmwatch at {self.base_url} did not answer in time") from error

    # -- migrations -------------------------------------------------------------

    async def submit(
        self,
        instance: str,
        source: str,
        destination: str | None,
        labels: dict[str, str] | None = None,
        profile: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Start a migration; without `destination` lmwatch chooses one."""
        body: dict[str, Any] = {"instance": instance, "source": source}
        if destination is not None:
            body["destination"] = destination
        if force:
            body["force"] = True
        if labels:
            body["labels"] = labels
        if profile:
            body["profile"] = profile
        result: dict[str, Any] = await self.request("POST", "/v1/migrations", body)
        return result

    async def migrations(self, state: str | None = None) -> list[dict[str, Any]]:
        path = "/v1/migrations" + (f"?state={quote(state)}" if state else "")
        data = await self.request("GET", path)
        return list(data.get("migrations", [])) if isinstance(data, dict) else []

    async def migration(self, migration_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/migrations/{_seg(migration_id)}")
        return result

    async def force_complete(self, migration_id: str, accept_pause: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST",
            f"/v1/migrations/{_seg(migration_id)}/force-complete",
            {"accept_pause": accept_pause},
        )
        return result

    async def cancel(self, migration_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/v1/migrations/{_seg(migration_id)}/cancel", {}
        )
        return result

    # -- drains -----------------------------------------------------------------

    async def drain(
        self,
        host: str,
        destinations: list[str] | None = None,
        profile: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"host": host}
        if destinations:
            body["destinations"] = destinations
        if profile:
            body["profile"] = profile
        result: dict[str, Any] = await self.request("POST", "/v1/drains", body)
        return result

    async def drains(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/v1/drains")
        return list(data.get("drains", [])) if isinstance(data, dict) else []

    async def get_drain(self, drain_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/drains/{_seg(drain_id)}")
        return result

    async def cancel_drain(self, drain_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/v1/drains/{_seg(drain_id)}/cancel", {}
        )
        return result

    # -- profiles ---------------------------------------------------------------

    async def profiles(self) -> Any:
        return await self.request("GET", "/v1/profiles")

    async def explain(
        self, instance: str, labels: dict[str, str] | None = None, uuid: str | None = None
    ) -> dict[str, Any]:
        query = []
        if labels:
            joined = ",".join(f"{k}={v}" for k, v in labels.items())
            query.append(f"labels={quote(joined, safe='=,')}")
        if uuid:
            query.append(f"uuid={quote(uuid)}")
        path = f"/v1/instances/{_seg(instance)}/profile"
        if query:
            path += "?" + "&".join(query)
        result: dict[str, Any] = await self.request("GET", path)
        return result

    async def placement(
        self,
        instance: str,
        destinations: list[str] | None = None,
        profile: str | None = None,
    ) -> dict[str, Any]:
        """Where lmwatch would move `instance` now, and why (moves nothing)."""
        query = []
        if destinations:
            query.append("destinations=" + quote(",".join(destinations), safe=","))
        if profile:
            query.append(f"profile={quote(profile)}")
        path = f"/v1/instances/{_seg(instance)}/placement"
        if query:
            path += "?" + "&".join(query)
        result: dict[str, Any] = await self.request("GET", path)
        return result


def _seg(value: str) -> str:
    return quote(value, safe="")


def _decode(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _error(status: int, reason: str, data: Any, text: str) -> ApiError:
    if isinstance(data, dict):
        title = str(data.get("title") or reason or f"HTTP {status}")
        detail = str(data.get("detail") or "")
        return ApiError(status, title, detail)
    return ApiError(status, reason or f"HTTP {status}", text.strip()[:500])
