"""The API's request and response bodies: the contract the web front end is written against."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["reader", "uploader", "admin"]


class ErrorBody(BaseModel):
    detail: str = Field(examples=["no image 0b9c... at this site"])


class Whoami(BaseModel):
    key_id: str = Field(examples=["3f2a9c0d1e4b5a67"])
    site_id: str = Field(examples=["site-01"])
    role: Role


class Deidentification(BaseModel):
    """What de-identification removed or changed, by attribute and by kind; never a value."""

    method: Literal["dicom-ps3.15", "raster-reencode"]
    options: list[str]
    key_id: str | None = Field(description="public id of the pseudonymisation secret (DICOM only)")
    action_counts: dict[str, int] = Field(examples=[{"removed": 31, "pseudonymised": 2, "uids_replaced": 4}])
    removed: list[str] = Field(examples=[["InstitutionAddress", "OtherPatientIDs", "(0009,0010)"]])
    changed: list[str] = Field(examples=[["PatientID", "PatientName", "StudyDate", "SOPInstanceUID"]])
    redactions: int = Field(description="boxes of burned-in text blanked")
    dates: str | None = Field(description="REMOVED, MODIFIED (shifted) or UNMODIFIED")


class ImageInfo(BaseModel):
    image_id: str = Field(examples=["0b9c1f0e-3c1a-4e55-9f0a-2b7d6c5e4a31"])
    site_id: str = Field(examples=["site-01"])
    content_type: str = Field(examples=["application/dicom"])
    size: int = Field(description="bytes of the stored, de-identified file", examples=[524614])
    created_at: datetime
    width: int | None = Field(examples=[3328])
    height: int | None = Field(examples=[4096])
    deidentification: Deidentification | None


class ImageList(BaseModel):
    images: list[ImageInfo]
    next_page_token: str | None = Field(description="pass back as page_token for the next page; null after the last")
    unreadable: list[str] = Field(default_factory=list, description="ids on this page whose stored key or metadata "
                                  "cannot be opened (a retired key, tampering): the rest of the page is still listed")


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"variant": "int8_static"}, {}]})

    variant: str | None = Field(None, description="a served variant (GET /v1/models); null or absent: the default")


class Presence(BaseModel):
    probability: float = Field(description="P(any lesion) = 1 - P(normal)", examples=[0.31])


class LesionType(BaseModel):
    malignant_given_lesion: float = Field(description="P(malignant | lesion)", examples=[0.42])


class Prediction(BaseModel):
    prediction_id: str
    image_id: str
    variant: str = Field(examples=["fp32"])
    backend: str = Field(examples=["pytorch"])
    model_version: str = Field(description="source run and model file sha256 prefix",
                               examples=["20261126-003823-demo-dd29/3e1f0a9b7c2d"])
    probabilities: dict[str, float] = Field(examples=[{"normal": 0.69, "benign": 0.18, "malignant": 0.13}])
    predicted_class: str = Field(examples=["normal"])
    presence: Presence
    type: LesionType
    latency_ms: float = Field(description="preprocessing and model time on the server, milliseconds")
    created_at: datetime


class PredictionList(BaseModel):
    predictions: list[Prediction]


class UploadAndPrediction(BaseModel):
    image: ImageInfo
    prediction: Prediction


class ModelCardSummary(BaseModel):
    """What a variant's model card says of its privacy (the whole card: ``GET /v1/models/{variant}/card``)."""

    run_id: str
    privacy_enabled: bool
    privacy_unit: str = Field(examples=["image"])
    max_site_epsilon: float | None = Field(examples=[7.99])
    delta: float | None = Field(examples=[1e-5])
    audit_epsilon_lower_bound: float | None = Field(examples=[0.0])
    membership_inference_auc: float | None = Field(examples=[0.51])
    privacy_checks_passed: bool
    warnings: list[str]


class ModelInfo(BaseModel):
    variant: str = Field(examples=["int8_static"])
    backend: str = Field(examples=["onnxruntime"])
    model_version: str
    input_size: int = Field(examples=[224])
    size_bytes: int
    metrics: dict[str, float | None] = Field(examples=[{"accuracy": 0.71, "macro_auc": 0.84}])
    card: ModelCardSummary | None = Field(description="null only when the service was started with "
                                          "allow_unchecked_models and the variant has no card")


class ModelList(BaseModel):
    default: str = Field(examples=["fp32"])
    models: list[ModelInfo]


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"site_id": "site-01", "role": "uploader", "name": "scanner room 2"}]})

    site_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    role: Role
    name: str = Field(min_length=1, max_length=64)
    expires_in_days: float | None = Field(None, gt=0, le=3650, description="the key stops working after this "
                                          "many days; null: no expiry")


class KeyInfo(BaseModel):
    key_id: str
    site_id: str
    role: Role
    name: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = Field(None, description="revoked keys are kept (audit lines name them)")
    last_used_at: datetime | None = Field(None, description="to the minute")


class IssuedKey(BaseModel):
    key_id: str
    api_key: str = Field(description="shown once; only its hash is stored")
    site_id: str
    role: Role
    name: str
    expires_at: datetime | None = None


class KeyList(BaseModel):
    keys: list[KeyInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    store: str = Field(examples=["ok"])
    models: list[str]
