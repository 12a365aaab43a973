"""What the app holds for its lifetime: the stores, the keys, the models, the de-identifier, the logs."""

from __future__ import annotations

from dataclasses import dataclass

from anonymize.profile import parse_options
from anonymize.secret import load_secret
from anonymize.vocabulary import load_vocabulary
from api.audit import AuditLog
from api.auth import ApiKeys
from api.crypto import load_keyring
from api.guard import TokenBuckets
from api.inference import ModelRegistry, load_registry
from api.metrics import Metrics
from api.settings import ApiSettings
from api.store.base import ImageStore
from api.store.factory import OpenStore
from api.store.factory import open_store as open_backend
from api.store.records import ServiceRecords
from api.uploads import Deidentifier


@dataclass
class Services:
    settings: ApiSettings
    images: ImageStore
    records: ServiceRecords
    keys: ApiKeys
    models: ModelRegistry
    deidentifier: Deidentifier
    audit: AuditLog
    metrics: Metrics
    key_limits: TokenBuckets | None = None  # per-key request rate (`api.guard`)

    def close(self) -> None:
        self.models.close()
        self.images.close()


def open_store(settings: ApiSettings) -> OpenStore:
    """The image store of the configured backend and the records beside it."""
    # Followed: a `mammofl keys rotate` while the service runs takes effect at once.
    return open_backend(settings.store_location(), load_keyring(settings.keyring_path, follow=True))


def open_services(settings: ApiSettings) -> Services:
    """Everything the routes need, loaded once at start-up; raises a MammoflError naming what is wrong."""
    deidentifier = Deidentifier(parse_options(settings.deidentification_options),
                                load_secret(settings.deidentification_secret_file),
                                max_pixels=settings.max_image_pixels, max_decoded_bytes=settings.max_decoded_bytes,
                                vocabulary=load_vocabulary(settings.deidentification_vocabulary_file))
    models = load_registry(settings.model_dir, variants=settings.variants, default=settings.default_variant,
                           threads=settings.cpu_threads, workers=settings.inference_workers,
                           micro_batch_size=settings.micro_batch_size,
                           micro_batch_wait_ms=settings.micro_batch_wait_ms,
                           allow_unchecked=settings.allow_unchecked_models)
    try:
        images, records = open_store(settings)
    except BaseException:
        models.close()
        raise
    return Services(settings, images, records, ApiKeys(records), models, deidentifier,
                    AuditLog(settings.audit_log_path), Metrics(),
                    TokenBuckets(settings.rate_limit_per_key) if settings.rate_limit_per_key else None)
