"""Daemon configuration: defaults < YAML config file < `LMWATCH_*` environment < explicit values.

The config file is named by `--config` or `LMWATCH_CONFIG`. Durations and rates may be
written with units (`1s`, `10Gbit/s`) and are stored in seconds and bytes/second.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from lmwatch.units import parse_duration, parse_rate

CONFIG_ENV = "LMWATCH_CONFIG"
TOKEN_FILE_NAME = "lmwatch.token"

Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Rate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0)]


class HostConfig(BaseModel):
    """One hypervisor host the daemon manages (for the real driver)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(min_length=1, description="Connection URI of the host's hypervisor.")
    peer_uri: str | None = Field(
        default=None, description="URI a source host uses to reach this one (default: uri)."
    )
    migration_address: str | None = Field(
        default=None, description="Address the destination listens on for migration traffic."
    )
    bandwidth: Rate | None = Field(default=None, description="Bytes/s cap for migrations.")
    shared_storage: list[str] | None = Field(
        default=None,
        description=(
            "Directories this host shares with other hosts at the same path; a disk is "
            "copied with its instance unless both hosts list its directory."
        ),
    )
    disks_address: str | None = Field(
        default=None,
        description="Where disk data goes when this host is the destination (tcp://HOST[:PORT]).",
    )
    call_threads: int | None = Field(
        default=None, ge=1, le=64, description="Calls to this host that run at once (default 4)."
    )
    call_queue: int | None = Field(
        default=None,
        ge=0,
        description="Calls that may wait for one before they fail at once (default 64).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LMWATCH_",
        extra="forbid",
        frozen=True,
        env_nested_delimiter="__",
    )

    listen_host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    token: SecretStr | None = None
    token_file: Path | None = None
    # A second token that allows reads only; when set, reads need either token.
    read_token: SecretStr | None = None
    read_token_file: Path | None = None
    # HTTPS: both or neither. Without them, a non-loopback listen_host needs allow_insecure.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_insecure: bool = False
    store_path: Path = Path("./lmwatch.db")
    # A PostgreSQL database instead of the SQLite file (docs/cluster.md):
    # postgresql://user@host:port/database; not with store_path.
    store_url: str | None = None
    # With store_url, this daemon's name among the daemons sharing the database (a
    # later registration under the same name replaces the earlier one: give each its
    # own), and its lease in seconds (docs/cluster.md).
    member: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    lease: Seconds = Field(default=10.0, ge=1.0)
    profiles_path: Path | None = None  # None: the profiles shipped with lmwatch
    # "sim", or the name of a real driver (lmwatch/drivers/<name>_driver.py).
    driver: str = Field(default="sim", pattern=r"^[a-z][a-z0-9]*$")
    inventory_path: Path | None = None  # sim driver; None: the embedded inventory
    hosts: dict[str, HostConfig] = Field(default_factory=dict)
    poll_interval: Seconds = 1.0
    max_per_source: int = Field(default=2, ge=1)
    max_per_destination: int = Field(default=2, ge=1)
    # PostgreSQL store: how long an operator's command on a migration another daemon
    # supervises waits for that daemon's answer (lmwatch/engine/commands.py).
    command_wait: Seconds = 5.0
    profile_check_interval: Seconds = 1.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line
    # HTTP server limits (DESIGN §5): slow or idle clients must not hold the daemon's
    # descriptors. A connection is closed when its request line and headers take longer
    # than http_header_timeout, when it stays idle between requests longer than
    # http_keepalive_timeout, and a body not sent within http_body_timeout is answered
    # 408. Beyond http_max_connections open connections, new ones get 503 and are closed.
    http_header_timeout: Seconds = 10.0
    http_body_timeout: Seconds = 30.0
    http_keepalive_timeout: Seconds = 15.0
    http_max_connections: int = Field(default=100, ge=1)
    http_backlog: int = Field(default=128, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("token is empty")
        if self.read_token is not None and self.read_token_file is not None:
            raise ValueError("set read_token or read_token_file, not both")
        if self.read_token is not None and not self.read_token.get_secret_value().strip():
            raise ValueError("read_token is empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if self.store_url is not None:
            if "store_path" in self.model_fields_set:
                raise ValueError("set store_path or store_url, not both")
            scheme = self.store_url.partition("://")[0]
            if "://" not in self.store_url or scheme not in ("postgresql", "postgres"):
                raise ValueError(
                    f"store_url must be a postgresql:// URL, not {scheme!r} "
                    "(a SQLite store is given by store_path)"
                )
        if self.driver != "sim" and not self.hosts:
            raise ValueError(f"driver {self.driver!r} needs at least one entry under hosts")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)

    def token_path(self) -> Path:
        """Where a generated token is written: next to the store."""
        if str(self.store_path) == ":memory:":
            return Path.cwd() / TOKEN_FILE_NAME
        return self.store_path.parent / TOKEN_FILE_NAME


_EXCLUSIVE = (
    ("token", "token_file"),
    ("token_file", "token"),
    ("read_token", "read_token_file"),
    ("read_token_file", "read_token"),
)


class ConfigError(Exception):
    """The configuration cannot be used; the message says why."""


def load_settings(config: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from defaults, the config file (argument or LMWATCH_CONFIG), the environment
    and `overrides` (highest; None values are ignored). Raises ConfigError."""
    from pydantic import ValidationError

    path = config if config is not None else os.environ.get(CONFIG_ENV)
    values = {key: value for key, value in overrides.items() if value is not None}
    # A token given here replaces a token file from the file or environment, and the
    # other way round (both given here is still refused).
    for one, other in _EXCLUSIVE:
        if one in values and other not in values:
            values[other] = None
    cls: type[Settings] = Settings
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        cls = type(
            "FileSettings",
            (Settings,),
            {"model_config": SettingsConfigDict(**{**Settings.model_config, "yaml_file": file})},
        )
    try:
        return cls(**values)
    except ValidationError as error:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'config'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        ]
        where = f" ({path})" if path else ""
        raise ConfigError("invalid configuration" + where + ":\n" + "\n".join(lines)) from None
    except (OSError, ValueError, yaml.YAMLError) as error:  # unreadable or malformed YAML
        raise ConfigError(f"cannot read config file {path}: {error}") from None
