"""The service's settings, read once from the environment (prefix ``MAMMOFL_API_``) or a .env file.

Everything below the edge receives an :class:`ApiSettings`; nothing else reads the environment
(the keyring alone may also come from ``MAMMOFL_KEYRING``, see :mod:`api.crypto`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from anonymize.profile import DEFAULT_OPTION_NAMES
from anonymize.secret import DEFAULT_SECRET_FILE
from api.store.cassandra import CassandraSettings
from api.store.factory import StoreLocation
from common.errors import ConfigError

ENV_PREFIX = "MAMMOFL_API_"


class ApiSettings(BaseSettings):
    """How the REST service stores, de-identifies, serves and limits.

    Lists (``cassandra_contact_points``, ``cors_origins``, ``variants``) are JSON in the
    environment: ``MAMMOFL_API_CORS_ORIGINS='["https://viewer.example"]'``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="forbid", frozen=True)

    store_backend: Literal["sqlite", "cassandra"] = "sqlite"
    sqlite_path: Path = Path("data/api/store.sqlite")
    cassandra_contact_points: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = Field(9042, ge=1, le=65535)
    cassandra_keyspace: str = Field("mammofl", pattern=r"^[a-z][a-z0-9_]{0,47}$")
    cassandra_local_dc: str = "datacenter1"
    cassandra_consistency: Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "EACH_QUORUM", "ALL"] = "LOCAL_QUORUM"
    cassandra_replication_factor: int = Field(1, ge=1)
    keyring_path: Path = Path("secrets/keyring.json")
    deidentification_secret_file: Path = DEFAULT_SECRET_FILE
    deidentification_options: tuple[str, ...] = DEFAULT_OPTION_NAMES
    # More words descriptors may keep under clean_descriptors (`mammofl anonymize --descriptor-vocabulary`).
    deidentification_vocabulary_file: Path | None = None

    model_dir: Path = Path("serving")
    variants: tuple[str, ...] | None = None
    default_variant: str | None = None
    cpu_threads: int | None = Field(None, ge=1, le=256)
    inference_workers: int = Field(1, ge=1, le=64)
    micro_batch_size: int = Field(1, ge=1, le=256)
    micro_batch_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    # Serve variants without a model card, or whose card's privacy checks failed (logged at start-up).
    allow_unchecked_models: bool = False

    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_json_bytes: int = Field(64 * 1024, ge=1024)
    body_idle_timeout_s: float = Field(10.0, gt=0.0, le=600.0)
    body_total_timeout_s: float = Field(120.0, gt=0.0, le=3600.0)
    max_concurrent_uploads: int = Field(8, ge=1, le=1024)
    rate_limit_per_address: int = Field(1200, ge=0)  # requests a minute; 0: no limit
    rate_limit_per_key: int = Field(600, ge=0)
    # The largest mammograms are about 23 Mpx (4096 x 5625); decoding costs several bytes per pixel.
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_decoded_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    cors_origins: tuple[str, ...] = ()
    audit_log_path: Path | None = Path("data/api/audit.jsonl")
    retry_after_s: int = Field(5, ge=1)
    web_dir: Path | None = Path(__file__).parent / "web"
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    docs_enabled: bool = False  # /docs and /redoc (Swagger UI and ReDoc load scripts from a CDN)

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: give both (HTTPS) or neither")
        for path in (self.tls_certfile, self.tls_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    @model_validator(mode="after")
    def _default_among_variants(self) -> ApiSettings:
        if self.variants is not None and self.default_variant is not None and self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not among variants {list(self.variants)}")
        return self

    def store_location(self) -> StoreLocation:
        return StoreLocation(self.store_backend, sqlite_path=self.sqlite_path, cassandra=self.cassandra())

    def cassandra(self) -> CassandraSettings:
        return CassandraSettings(contact_points=self.cassandra_contact_points, port=self.cassandra_port,
                                 keyspace=self.cassandra_keyspace, local_dc=self.cassandra_local_dc,
                                 consistency=self.cassandra_consistency,
                                 replication_factor=self.cassandra_replication_factor)


def load_settings(env_file: Path | None = None) -> ApiSettings:
    """Settings from the environment, and from ``env_file`` (a .env) for what the environment lacks.

    Raises ConfigError naming each invalid or unknown setting by its environment variable.
    """
    if env_file is not None and not env_file.is_file():
        raise ConfigError(f"settings file {env_file} does not exist")
    try:
        return ApiSettings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as error:
        problems = "; ".join(f"{_variable(item['loc'])}: {item['msg']}" for item in error.errors())
        raise ConfigError(f"invalid service settings ({env_file or 'environment'}): {problems}") from None


def _variable(location: tuple) -> str:
    """The environment variable of a settings field ("store_backend" -> MAMMOFL_API_STORE_BACKEND)."""
    name = "_".join(str(part) for part in location).upper()
    return name if name.startswith(ENV_PREFIX) else ENV_PREFIX + name
