"""What the service keeps beside the images: API keys (hashed) and past predictions.

Both live in the image store's database (a table in the SQLite file, a table in the Cassandra
keyspace), so one backend setting covers everything. A key record is a site, a role, a name and
a hash; a prediction (probabilities and model provenance: health data about a patient) is
stored sealed with its image's data key (`sealed_document`).
Predictions are site-scoped like the images: every call names the site.
"""

from __future__ import annotations

import base64
import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.store.base import ImageStore


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: ``key_hash`` is the SHA-256 of its secret part, never the key itself."""

    key_id: str
    site_id: str
    role: str
    name: str
    key_hash: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None  # a revoked key is kept, so that audit lines keep their holder
    last_used_at: datetime | None = None  # to the minute at best (`api.auth.ApiKeys` writes it at most that often)


@dataclass(frozen=True)
class PredictionRecord:
    """One stored prediction; ``document`` is the JSON the API returned for it."""

    site_id: str
    image_id: uuid.UUID
    prediction_id: uuid.UUID
    created_at: datetime
    document: dict[str, Any]


SEALED_PREFIX = "sealed:v1:"


def sealed_document(store: ImageStore, record: PredictionRecord) -> str:
    """The prediction as it is stored: sealed with its image's data key (predictions are health data),
    so that it is unreadable without the keyring and gone for good with the image's key."""
    sealed = store.seal_prediction(record.site_id, record.image_id, record.prediction_id, record.document)
    return SEALED_PREFIX + base64.b64encode(sealed).decode("ascii")


def opened_document(store: ImageStore, site_id: str, image_id: uuid.UUID, prediction_id: uuid.UUID,
                    stored: str) -> dict[str, Any]:
    """The prediction's JSON from its stored form (plain JSON in stores written before sealing)."""
    if not stored.startswith(SEALED_PREFIX):
        return json.loads(stored)
    sealed = base64.b64decode(stored.removeprefix(SEALED_PREFIX))
    return store.open_prediction(site_id, image_id, prediction_id, sealed)


class ServiceRecords(ABC):
    """API keys and predictions on the image store's backend; safe to share between threads."""

    @abstractmethod
    def add_key(self, record: ApiKeyRecord) -> None:
        """Stores a new key record."""

    @abstractmethod
    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key record (revoked ones too), or None when there is none."""

    @abstractmethod
    def list_keys(self, site_id: str | None = None) -> list[ApiKeyRecord]:
        """Every key record (of ``site_id`` when given), oldest first."""

    @abstractmethod
    def revoke_key(self, key_id: str, when: datetime) -> None:
        """Marks the key revoked at `when`; a revoked key no longer authenticates, its record stays."""

    @abstractmethod
    def touch_key(self, key_id: str, when: datetime) -> None:
        """Records that the key was last used at `when`."""

    @abstractmethod
    def add_prediction(self, record: PredictionRecord) -> None:
        """Stores a prediction of one image."""

    @abstractmethod
    def list_predictions(self, site_id: str, image_id: uuid.UUID) -> list[PredictionRecord]:
        """The image's predictions, oldest first."""

    @abstractmethod
    def delete_predictions(self, site_id: str, image_id: uuid.UUID) -> None:
        """Removes every prediction of the image (when the image is deleted)."""

    @abstractmethod
    def ping(self) -> None:
        """Raises :class:`~api.store.base.StoreUnavailableError` unless the database answers now."""
