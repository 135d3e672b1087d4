"""Agent configuration: one pydantic model per section, loaded once in `main()`.

Sources, strongest first: command-line flags, `EDGEDI_*` environment variables
(nested with `__`, e.g. `EDGEDI_BROKER__PORT=1884`), the YAML file given with
`--config`, then the defaults below. The MQTT password may also come from
systemd's `$CREDENTIALS_DIRECTORY/mqtt-password` (LoadCredential=), so it never
sits in a world-readable file, or from `broker.password_file` (which wins). Unknown
keys are errors, not silently ignored.

The `broker` section (`BrokerSettings`) is every command's connection settings:
`load_connection` reads it alone, from the same sources, for `infer`, `status`,
`watch` and `demo` (edgedi.agent.connection holds the shared flags).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ConfigError(ValueError):
    """The configuration is invalid; `lines` holds one `field.path: message` per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Section):
    host: str = Field("127.0.0.1", description="MQTT broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port")
    username: str | None = Field(None, description="MQTT user name (per-device credentials)")
    password: str | None = Field(
        None,
        description="MQTT password; prefer $CREDENTIALS_DIRECTORY/mqtt-password under systemd",
    )
    password_file: Path | None = Field(
        None, description="file holding the MQTT password (read at start; beats `password`)"
    )
    tls: bool = Field(
        False,
        description="connect with TLS; without tls_ca_file the system's CA store checks the broker",
    )
    tls_ca_file: Path | None = Field(None, description="CA bundle; setting it turns TLS on")
    tls_certfile: Path | None = Field(
        None, description="client certificate (PEM) for brokers that ask for one; turns TLS on"
    )
    tls_keyfile: Path | None = Field(
        None, description="private key of tls_certfile (if not in the certificate file)"
    )
    # Seconds, not a minute: a silent device is noticed after ~1.5 keepalives.
    keepalive_s: int = Field(5, ge=2, le=600, description="MQTT keepalive in seconds")
    topic_root: str = Field("edgedi/v1", description="topic prefix shared by the fleet")
    cluster: str = Field("default", pattern=r"^[A-Za-z0-9_-]+$", description="cluster name")
    # The planner's transfer model: measured through the broker at start
    # (`agent.link_probe`) unless set here, which overrides the measurement.
    measure_link: bool = Field(
        True, description="measure latency and bandwidth through the broker at start"
    )
    link_mbit_s: float = Field(
        100.0,
        gt=0,
        le=1_000_000,
        description="this device's link to the broker, Mbit/s (set: overrides the measurement)",
    )
    link_latency_ms: float = Field(
        1.0,
        ge=0,
        le=10_000,
        description="one-way latency per message, milliseconds (set: overrides the measurement)",
    )

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None or self.tls_certfile is not None

    @model_validator(mode="after")
    def _files_exist(self) -> BrokerSettings:
        for name in ("password_file", "tls_ca_file", "tls_certfile", "tls_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if self.tls_keyfile is not None and self.tls_certfile is None:
            raise ValueError("tls_keyfile needs tls_certfile")
        return self


class ComputeSettings(_Section):
    threads: int | None = Field(None, ge=1, le=256, description="torch threads (default: all)")
    models: list[str] = Field(
        default_factory=lambda: ["vgg16-edgedi", "resnet18-edgedi", "tiny", "tiny-edgedi"],
        description="models this device holds and may be asked to run",
    )
    checkpoint_dir: Path | None = Field(
        None, description="folder of trained checkpoints; the shipped ones are used otherwise"
    )
    input_size: int = Field(200, ge=16, le=1024, description="image side length in pixels")
    measure_tiles: bool = Field(
        True,
        description="time real tiles of every held model at start (cached): the planner's "
        "per-unit compute model; off: only the micro-benchmark profile is announced",
    )
    profile_seconds: float = Field(
        5.0, gt=0, le=60, description="time budget of the start-up micro-benchmark"
    )
    slowdown: float = Field(
        1.0,
        ge=1.0,
        le=100.0,
        description="emulate a slower device: sleep so each tile takes this many times longer",
    )
    cgroup_tasks: Path | None = Field(
        None,
        description="emulation only: a cgroup v1 `tasks` file the compute thread joins at "
        "start, so a CPU quota limits the computing and not the messaging (local clusters)",
    )
    max_active_tiles: int = Field(
        8, ge=1, le=1024, description="tiles in progress at once (they interleave at gates)"
    )
    max_queued_tiles: int = Field(
        32, ge=1, le=100_000, description="tiles waiting to start; more are refused"
    )


class PlannerSettings(_Section):
    candidate: bool = Field(True, description="may this device be elected planner/coordinator")
    priority: int = Field(
        0, description="election order among candidates (lower wins, then device id)"
    )
    strategy: str = Field(
        "auto",
        description="partitioning strategy for new plans (auto: the fastest replayed plan "
        "of every row strategy on 1..N devices, one device included)",
    )
    model: str | None = Field(
        None, description="model of the plan published on plans/current (default: the first held)"
    )
    cgroup_procs: Path | None = Field(
        None,
        description="emulation only: a cgroup `cgroup.procs` file the planning process joins "
        "at start, so a leader's planning takes another core's time, not its event loop's "
        "quota (local clusters)",
    )


class JobSettings(_Section):
    deadline_s: float = Field(30.0, gt=0, description="default end-to-end deadline of a job")
    max_in_flight: int = Field(8, ge=1, le=256, description="jobs coordinated at once")
    max_payload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest message accepted from a peer"
    )
    wire_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of tiles on the wire (float16 halves bytes, ~2e-3 error)"
    )
    max_queued: int = Field(
        64, ge=0, le=100_000, description="jobs waiting for a slot; more are refused with an error"
    )
    result_cache: int = Field(
        1024, ge=1, le=1_000_000, description="finished results kept for resubmitted job ids"
    )
    tile_attempts: int = Field(
        3, ge=1, le=10, description="tries per tile (re-dispatched on failure or device loss)"
    )
    drain_s: float = Field(
        10.0, ge=0, le=600, description="on SIGTERM, wait this long for in-flight work"
    )
    straggler_factor: float = Field(
        3.0,
        ge=1.0,
        le=100.0,
        description="a tile is overdue after this many times its predicted time",
    )
    straggler_min_s: float = Field(
        1.0, gt=0, le=600, description="a tile is never overdue sooner than this"
    )
    speculative_copies: int = Field(
        2, ge=0, le=5, description="extra copies of an overdue tile (first result wins)"
    )
    direct: bool = Field(
        True,
        description="direct data plane: devices send rows and gate partials to each other "
        "(the leader only scatters the input and runs the tail); off: every segment "
        "boundary and gate round goes through the leader",
    )
    split_head: bool = Field(
        True,
        description="direct data plane, a head that starts with a linear layer on the whole "
        "map (VGG-16's classifier): each last-segment tile applies that layer to its own "
        "rows and sends the partial sums; off: the rows go to the leader, which runs it all",
    )
    journal_size: int = Field(
        256,
        ge=1,
        le=100_000,
        description="unanswered jobs a standby remembers, to run them if it takes over",
    )


class ClockSettings(_Section):
    warn_offset_s: float = Field(
        2.0,
        gt=0,
        description="log a warning when this device's clock is further than this from the "
        "leader's (no decision depends on it; people reading logs of two devices do)",
    )


class MetricsSettings(_Section):
    # Off by default: an open port is the operator's choice, and 127.0.0.1 keeps it
    # for a local scraper (or an SSH tunnel) unless a host is named.
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics over HTTP on this port (null: off; 0: any free "
        "port, for tests)",
    )
    host: str = Field("127.0.0.1", description="address the metrics server listens on")


class HomeAssistantSettings(_Section):
    discovery: bool = Field(
        False,
        description="publish Home Assistant MQTT discovery configs (retained): this device's "
        "connectivity, and, while leading, the cluster's last result; off: clear them",
    )
    discovery_prefix: str = Field(
        "homeassistant",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Home Assistant's discovery prefix",
    )


class AgentSettings(BaseSettings):
    """Everything an `edgedi agent` needs; see `edgedi agent --check-config`."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEDI_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    # Set on a subclass by `load_settings` so the YAML path is not global state.
    yaml_path: ClassVar[Path | None] = None

    device_id: str = Field(..., pattern=DEVICE_ID_PATTERN, description="unique device name")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)  # type: ignore[arg-type]
    compute: ComputeSettings = Field(default_factory=ComputeSettings)  # type: ignore[arg-type]
    planner: PlannerSettings = Field(default_factory=PlannerSettings)  # type: ignore[arg-type]
    jobs: JobSettings = Field(default_factory=JobSettings)  # type: ignore[arg-type]
    clock: ClockSettings = Field(default_factory=ClockSettings)  # type: ignore[arg-type]
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)  # type: ignore[arg-type]
    home_assistant: HomeAssistantSettings = Field(
        default_factory=HomeAssistantSettings  # type: ignore[arg-type]
    )
    state_dir: Path | None = Field(
        None,
        description="folder for the cached device profile ($STATE_DIRECTORY under systemd)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _flags_environment_file(settings_cls, cls.yaml_path, init_settings, env_settings)


def _flags_environment_file(
    settings_cls: type[BaseSettings],
    yaml_path: Path | None,
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Every command's sources, strongest first: flags, environment, the YAML file."""
    sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
    if yaml_path is not None:
        sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
    return tuple(sources)


class ConnectionSettings(BaseSettings):
    """The `broker` section alone, for the client commands: the agent's sources and
    model, other sections ignored (so an agent's YAML file serves as well)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEDI_", env_nested_delimiter="__", extra="ignore", frozen=True
    )
    yaml_path: ClassVar[Path | None] = None

    broker: BrokerSettings = Field(default_factory=BrokerSettings)  # type: ignore[arg-type]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _flags_environment_file(settings_cls, cls.yaml_path, init_settings, env_settings)


_S = TypeVar("_S", bound=BaseSettings)


def _credential_password(environ: dict[str, str]) -> str | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / "mqtt-password"
    return path.read_text().strip() if path.exists() else None


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            cleaned[key] = value
    return cleaned


def _validated(settings_cls: type[_S], values: dict[str, Any]) -> _S:
    try:
        return settings_cls(**values)
    except ValidationError as error:
        raise ConfigError(
            [
                f"{'.'.join(str(part) for part in e['loc']) or '(root)'}: {e['msg']}"
                for e in error.errors()
            ]
        ) from None


def _with_password_file(broker: BrokerSettings) -> BrokerSettings:
    """`broker` with `password` read from `password_file`, when one is named."""
    if broker.password_file is None:
        return broker
    try:
        password = broker.password_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            [f"broker.password_file: cannot read {broker.password_file}: {error}"]
        ) from None
    return broker.model_copy(update={"password": password})


def _sources(
    config_file: Path | None, overrides: dict[str, Any] | None, environ: dict[str, str]
) -> dict[str, Any]:
    """The init values common to every command: flags, then systemd's credential."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError([f"--config: no such file: {config_file}"])
    values = _drop_none(overrides or {})
    password = _credential_password(environ)
    if password is not None:
        values.setdefault("broker", {}).setdefault("password", password)
    return values


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> AgentSettings:
    """Load and validate the settings; raise ConfigError with readable lines on failure.

    `overrides` are command-line values (None means "not given"), nested by section,
    e.g. `{"device_id": "pi-1", "broker": {"host": "10.0.0.2"}}`.
    """
    environ = dict(os.environ) if environ is None else environ
    values = _sources(config_file, overrides, environ)
    settings_cls: type[AgentSettings] = type(
        "AgentSettingsFromFile", (AgentSettings,), {"yaml_path": config_file}
    )
    state_directory = environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    if state_directory and "EDGEDI_STATE_DIR" not in environ:
        values.setdefault("state_dir", state_directory.split(":")[0])
    settings = _validated(settings_cls, values)
    broker = _with_password_file(settings.broker)
    return settings if broker is settings.broker else settings.model_copy(update={"broker": broker})


def load_connection(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> BrokerSettings:
    """The broker settings of a client command (`infer`, `status`, `watch`), from the
    same sources as the agent's: flags (`overrides`, as `{"broker": {...}}`), the
    `EDGEDI_BROKER__*` environment, the `broker:` section of the YAML file (an
    agent's file will do) and systemd's credential. Raises ConfigError."""
    environ = dict(os.environ) if environ is None else environ
    values = _sources(config_file, overrides, environ)
    settings_cls: type[ConnectionSettings] = type(
        "ConnectionSettingsFromFile", (ConnectionSettings,), {"yaml_path": config_file}
    )
    return _with_password_file(_validated(settings_cls, values).broker)
