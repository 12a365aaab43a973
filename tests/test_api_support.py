"""Shared makings of the API tests (no tests here): a tiny served model, DICOMs with fake PHI,
settings on temporary folders, and an app started with keys for two sites and three roles.

The model is an untrained smallcnn at 64 px (the API's contract does not depend on accuracy),
published as ``fp32`` (PyTorch) and ``int8_dynamic`` (ONNX Runtime), exactly as `mammofl
compress` lays out ``serving/<variant>/``. Built once per test session.
"""

from __future__ import annotations

import functools
import json
import io
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from anonymize.secret import create_secret
from api.app import create_app
from api.crypto import create_key
from api.settings import ApiSettings
from common.data.synthetic_dicom import synthesize_dataset
from common.models.classifier import CLASS_NAMES, build_classifier
from server.compression.model_files import (
    ONNX_INPUT,
    ONNX_OPSET,
    ONNX_OUTPUT,
    ProbabilityModel,
    write_pytorch_model,
)
from server.compression.quantize import quantize_dynamic_int8
from server.model_card import CARD_JSON, CARD_VERSION
from server.compression.serving import (
    Preprocessing,
    ServingMetadata,
    SourceRun,
    sha256_of,
    write_metadata,
)
from tests.fixtures.anonymize_canaries import plant_canaries

IMAGE_SIZE = 64
SITES = ("site-a", "site-b")
ROLES = ("reader", "uploader", "admin")
MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"


@functools.cache
def serving_dir() -> Path:
    """``serving/`` with fp32 and int8_dynamic variants of one tiny model."""
    root = Path(tempfile.mkdtemp(prefix="api-serving-"))
    torch.manual_seed(0)
    model = build_classifier("smallcnn", norm="batch").eval()
    spec = {"encoder": "smallcnn", "norm": "batch", "dropout": 0.2, "num_classes": len(CLASS_NAMES)}
    fp32 = root / "fp32" / "model.pt"
    fp32.parent.mkdir(parents=True)
    write_pytorch_model(model, spec, "fp32", fp32)
    onnx_fp32 = root / "work" / "fp32.onnx"
    onnx_fp32.parent.mkdir()
    with warnings.catch_warnings():
        # The legacy exporter takes 2 s where the torch.export one (what compress uses) takes 90 s here;
        # the served file's origin does not matter to the API.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(ProbabilityModel(model), (torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE),), str(onnx_fp32),
                          dynamo=False, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}}, opset_version=ONNX_OPSET)
    int8 = root / "int8_dynamic" / "model.onnx"
    int8.parent.mkdir(parents=True)
    quantize_dynamic_int8(onnx_fp32, int8, root / "work")
    for path, backend, precision in ((fp32, "pytorch", "fp32"), (int8, "onnxruntime", "int8_dynamic")):
        write_metadata(path.parent, ServingMetadata(
            variant=path.parent.name, backend=backend, precision=precision, pruning="none", model_file=path.name,
            sha256=sha256_of(path), class_names=CLASS_NAMES,
            preprocessing=Preprocessing(mode="full", image_size=IMAGE_SIZE),
            metrics={"accuracy": 0.5, "macro_auc": 0.6}, source_run=SourceRun(
                run_id="test-run", checkpoint="model/best.pt", checkpoint_sha256="0" * 64)))
        (path.parent / CARD_JSON).write_text(json.dumps(card_for(path.parent.name, sha256_of(path))))
    return root


def card_for(variant: str, sha256: str, *, passed: bool = True) -> dict:
    """A model card as `server.model_card.build_card` lays it out (the API reads it, not the run)."""
    return {"format_version": CARD_VERSION, "model": {"variant": variant, "sha256": sha256},
            "training": {"run_id": "test-run", "sites": [{"site": "site-01", "images": 40}]},
            "privacy": {"enabled": True, "unit": "image", "client_level": None,
                        "sites": [{"site": "site-01", "images": 40, "epsilon": 7.5, "delta": 1e-5}]},
            "audit": {"epsilon_lower_bound": 0.2, "membership_inference": {"auc": 0.52}},
            "utility": {"metrics": {"accuracy": 0.5}}, "compression": None, "pretraining": None,
            "privacy_checks": {"passed": passed, "failures": [] if passed else ["site-01 exceeded its budget"],
                               "warnings": []}}


@functools.cache
def mammogram_paths() -> tuple[Path, ...]:
    """Synthetic mammograms (real DICOM, fake identifying metadata), 64 px tall."""
    root = Path(tempfile.mkdtemp(prefix="api-dicom-"))
    synthesize_dataset(root / "data", sites=1, per_site=3, size=64, seed=5, burned_in_text=0.0)
    paths = sorted(path for path in (root / "data").rglob("*.dcm")
                   if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY)
    assert paths, "the synthetic generator wrote no mammogram"
    return tuple(paths)


@functools.cache
def canary_dicom() -> bytes:
    """A mammogram carrying planted, recognisable fake PHI (see tests/fixtures/anonymize_canaries.py)."""
    target = Path(tempfile.mkdtemp(prefix="api-canary-")) / "canary.dcm"
    plant_canaries(mammogram_paths()[0], target)
    return target.read_bytes()


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    """A grey PNG with a bright blob on the left (breast-like) and a text chunk that must not survive."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 8: -size // 8, : size // 2] = 180 + rng.integers(0, 40, (size - 2 * (size // 8), size // 2))
    info = PngInfo()
    info.add_text("Comment", "ZQXPNGPATIENT")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def settings_for(root: Path, **changes) -> ApiSettings:
    """Settings on fresh files under ``root``: keyring, de-identification secret, SQLite store, audit log."""
    keyring, secret = root / "secrets" / "keyring.json", root / "secrets" / "anonymize.key"
    if not keyring.exists():
        create_key(keyring)
        create_secret(secret)
    values = {"sqlite_path": root / "store.sqlite", "keyring_path": keyring, "deidentification_secret_file": secret,
              "model_dir": serving_dir(), "audit_log_path": root / "audit.jsonl", "web_dir": None,
              "cpu_threads": 1, "rate_limit_per_address": 0, "rate_limit_per_key": 0, **changes}
    return ApiSettings(**values)


@dataclass(frozen=True)
class RunningApp:
    client: TestClient
    settings: ApiSettings
    keys: dict[tuple[str, str], str]  # (site, role) -> api key

    def auth(self, site: str = "site-a", role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[(site, role)]}"}

    @property
    def services(self):
        return self.client.app.state.services


@contextmanager
def running_app(settings: ApiSettings) -> Iterator[RunningApp]:
    """The app started (lifespan run) with one key per site and role."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api_keys = client.app.state.services.keys
        keys = {(site, role): api_keys.create(site, role, f"{role} of {site}").api_key for site in SITES for role in ROLES}
        yield RunningApp(client, settings, keys)


def upload(app: RunningApp, data: bytes, *, site: str = "site-a", role: str = "uploader",
           filename: str = "image.dcm", path: str = "/v1/images", **form):
    return app.client.post(path, files={"file": (filename, data, "application/octet-stream")}, data=form or None,
                           headers=app.auth(site, role))
