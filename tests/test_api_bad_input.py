"""Bad input never yields a 500: each is a 4xx (or 503 for a store outage) with a clear
``{"detail": ...}``, and nothing of a refused or failed upload is stored."""

from __future__ import annotations

import io
import struct
import uuid
import zlib

import pydicom
import pytest

from api.store.base import StoreUnavailableError
from tests.test_api_support import (
    canary_dicom,
    png_bytes,
    running_app,
    settings_for,
    upload,
)

MAX_UPLOAD_BYTES = 200_000


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = settings_for(tmp_path_factory.mktemp("api-bad"), max_upload_bytes=MAX_UPLOAD_BYTES)
    with running_app(settings) as running:
        yield running


def stored_rows(app) -> tuple[int, int]:
    """(images, chunks) in the SQLite file: what a refused upload must not change."""
    store = app.services.images
    return (store.read_rows("SELECT count(*) FROM images")[0][0],
            store.read_rows("SELECT count(*) FROM image_chunks")[0][0])


def png_declaring(width: int, height: int, colour_type: int = 0) -> bytes:
    """A tiny PNG whose header declares width x height pixels: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dicom_declaring(rows: int, columns: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(canary_dicom()))
    ds.Rows, ds.Columns = rows, columns
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes())).save(buffer, format="JPEG")
    return buffer.getvalue()


BAD_UPLOADS = {
    "text": (b"patient: nobody\n" * 20, 415, "not an image"),
    "empty": (b"", 422, "empty"),
    "truncated-dicom": (None, 422, "truncated"),
    "truncated-png": (png_bytes()[:120], 422, "cannot be decoded"),
    "truncated-jpeg": (jpeg_bytes()[:200], 422, "cannot be decoded"),
    "png-bomb": (png_declaring(100_000, 100_000), 422, "over the limit"),
    # 8900 x 8900 RGBA: 308 KB that decoded to 1.2 GB; fewer pixels in RGBA still cost too much memory.
    "png-rgba-bomb": (png_declaring(8900, 8900, colour_type=6), 422, "over the limit"),
    "png-rgba-memory": (png_declaring(6000, 6000, colour_type=6), 422, "MiB to decode"),
    "dicom-absurd-dimensions": (None, 422, "over the limit"),
}


@pytest.mark.parametrize("path", ["/v1/images", "/v1/predict"])
@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_a_bad_upload_is_a_4xx_with_a_clear_message_and_stores_nothing(app, case, path):
    data, status, phrase = BAD_UPLOADS[case]
    if case == "truncated-dicom":
        data = canary_dicom()[: len(canary_dicom()) // 2]
    elif case == "dicom-absurd-dimensions":
        data = dicom_declaring(60_000, 60_000)
    before = stored_rows(app)
    response = upload(app, data, path=path)
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"]
    assert "ZQX" not in response.text
    assert stored_rows(app) == before


def test_a_json_body_where_an_upload_belongs_is_415(app):
    response = app.client.post("/v1/images", json={"file": "x"}, headers=app.auth(role="uploader"))
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]


def test_a_multipart_body_without_the_file_field_is_422_naming_it(app):
    response = app.client.post("/v1/images", files={"other": ("a.png", png_bytes())}, headers=app.auth(role="uploader"))
    assert response.status_code == 422 and "file" in response.json()["detail"]


def test_a_broken_multipart_body_is_400(app):
    response = app.client.post("/v1/images", content=b"--nope\r\n\r\ngarbage",
                               headers={**app.auth(role="uploader"), "Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= response.status_code < 500


def test_a_body_over_the_limit_is_refused_from_its_content_length(app):
    before = stored_rows(app)
    response = upload(app, b"\0" * (MAX_UPLOAD_BYTES + 1))
    assert response.status_code == 413 and str(MAX_UPLOAD_BYTES) in response.json()["detail"]
    assert stored_rows(app) == before


def test_a_streamed_body_over_the_limit_is_refused_while_streaming(app):
    sent = []

    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.dcm\"\r\n\r\n"
        for _ in range(100):
            sent.append(1)
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    before = stored_rows(app)
    response = app.client.post("/v1/images", content=body(),
                               headers={**app.auth(role="uploader"), "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413, response.text
    assert stored_rows(app) == before


@pytest.mark.parametrize("image_id", [str(uuid.uuid4()), "not-a-uuid", "%20", "0" * 300])
@pytest.mark.parametrize("method,suffix", [("GET", ""), ("GET", "/content"), ("GET", "/predictions"),
                                           ("POST", "/predictions"), ("DELETE", "")])
def test_unknown_image_ids_are_404(app, image_id, method, suffix):
    response = app.client.request(method, f"/v1/images/{image_id}{suffix}", headers=app.auth())
    assert response.status_code == 404 and "no image" in response.json()["detail"]


def test_unknown_key_ids_are_404(app):
    assert app.client.delete("/v1/keys/0123456789abcdef", headers=app.auth()).status_code == 404


@pytest.fixture(scope="module")
def stored_image(app) -> str:
    return upload(app, png_bytes(), filename="x.png").json()["image_id"]


@pytest.mark.parametrize("body,phrase", [(b"{not json", "not valid JSON"), (b'{"variant": 3}', "variant"),
                                         (b'{"variant": "fp64"}', "not served"), (b'{"extra": 1}', "extra"),
                                         (b"[1, 2]", "body")])
def test_a_bad_prediction_request_body_is_422(app, stored_image, body, phrase):
    response = app.client.post(f"/v1/images/{stored_image}/predictions", content=body,
                               headers={**app.auth(), "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert phrase in response.json()["detail"]


def test_an_unknown_variant_on_predict_refuses_before_storing(app):
    before = stored_rows(app)
    response = upload(app, png_bytes(), filename="x.png", path="/v1/predict", variant="fp64")
    assert response.status_code == 422 and "not served" in response.json()["detail"]
    assert stored_rows(app) == before


@pytest.mark.parametrize("query,status", [({"page_size": 0}, 422), ({"page_size": "many"}, 422),
                                          ({"page_token": "bm9wZQ=="}, 400), ({"page_token": "!!"}, 400)])
def test_bad_paging_is_a_4xx(app, query, status):
    response = app.client.get("/v1/images", params=query, headers=app.auth())
    assert response.status_code == status and response.json()["detail"]


def test_a_store_outage_during_an_upload_is_503_with_retry_after_and_leaves_nothing(app, monkeypatch):
    store = app.services.images
    real_chunks = store._encrypted_chunks

    def first_chunk_then_outage(*arguments):
        yield next(iter(real_chunks(*arguments)))
        raise StoreUnavailableError("the disk went away")

    monkeypatch.setattr(store, "_encrypted_chunks", first_chunk_then_outage)
    before = stored_rows(app)
    response = upload(app, canary_dicom())
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "retry" in response.json()["detail"]
    assert stored_rows(app) == before


def test_a_store_outage_while_storing_the_prediction_leaves_no_image_from_predict(app, monkeypatch):
    def outage(*arguments):
        raise StoreUnavailableError("database is locked")

    monkeypatch.setattr(app.services.records, "add_prediction", outage)
    before = stored_rows(app)
    response = upload(app, png_bytes(), filename="x.png", path="/v1/predict")
    assert response.status_code == 503 and "retry-after" in response.headers
    assert stored_rows(app) == before


def test_readiness_is_503_while_the_store_is_unreachable(app, monkeypatch):
    def outage():
        raise StoreUnavailableError("unreachable")

    monkeypatch.setattr(app.services.records, "ping", outage)
    response = app.client.get("/readyz")
    assert response.status_code == 503 and response.json()["status"] == "not ready"
    assert response.headers["retry-after"] == "5"
    assert app.client.get("/healthz").status_code == 200


def test_an_upload_with_invalid_header_values_logs_none_of_them(app, caplog):
    import logging
    import warnings

    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(io.BytesIO(canary_dicom()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add(DataElement(0x00200052, "UI", "1.2.ZQXUIDSMITH"))  # invalid UI: pydicom quotes it
        buffer = io.BytesIO()
        ds.save_as(buffer)
    with caplog.at_level(logging.DEBUG):
        response = upload(app, buffer.getvalue())
    assert response.status_code < 500
    assert "Invalid value for VR UI" in caplog.text and "ZQXUIDSMITH" not in caplog.text


def mutated_dicoms(count: int, seed: int):
    """Real DICOM files with 1-4 bytes of their header overwritten, inserted or deleted."""
    import random

    data = canary_dicom()
    pixels = data.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010): mutate the header, not the image
    rng = random.Random(seed)
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            position, kind = rng.randrange(132, pixels), rng.random()
            if kind < 0.6:
                mutated[position] = rng.randrange(256)
            elif kind < 0.8:
                mutated.insert(position, rng.randrange(256))
            else:
                del mutated[position]
        yield bytes(mutated)


def test_fuzzed_dicom_uploads_are_stored_or_refused_never_a_server_error(app):
    # Before: an unknown VR (NotImplementedError), a value that did not fit its VR or a malformed
    # window (TypeError in the LUT code) answered 500. 200 mutations, seeded: a few seconds.
    statuses = {}
    for data in mutated_dicoms(200, seed=16):
        response = upload(app, data)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, response.text
        assert "ZQX" not in response.text  # a refusal quotes no header value
    assert statuses.get(201) and statuses.get(422)  # both outcomes occur: the mutations bite


def test_every_domain_error_has_an_answer_in_the_one_table():
    # Every MammoflError our packages define is answered from api.app.DOMAIN_ERRORS (the most
    # specific entry along its class hierarchy), none falls through to the server's bare 500.
    import importlib
    import pkgutil

    import anonymize
    import api
    import common
    from api.app import DOMAIN_ERRORS
    from common.errors import MammoflError

    for package in (api, anonymize, common):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    answered = {error: next(entry for entry in error.__mro__ if entry in DOMAIN_ERRORS) for error in subclasses(MammoflError)}
    statuses = {error.__name__: DOMAIN_ERRORS[entry].status for error, entry in answered.items()}
    assert statuses["ImageNotFoundError"] == 404 and statuses["StoreUnavailableError"] == 503
    assert statuses["ApiKeyNotFoundError"] == 404 and statuses["VariantNotFoundError"] == 422
    assert statuses["DicomReadError"] == 422 and statuses["WrongKeyError"] == 500


@pytest.mark.parametrize(("error", "status", "internal"), [
    ("data", 422, False), ("model", 500, True), ("integrity", 500, True)])
def test_a_domain_error_inside_a_route_answers_from_the_table_without_its_text_when_internal(
        app, monkeypatch, error, status, internal):
    from api import operations
    from api.crypto import IntegrityError
    from common.errors import DataError, ModelError

    raised = {"data": DataError("the stored image cannot be decoded"), "model": ModelError("SECRET-INTERNAL-PATH"),
              "integrity": IntegrityError("SECRET-INTERNAL-PATH")}[error]

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(operations, "image_content", failing)
    stored = upload(app, png_bytes(seed=31)).json()["image_id"]

    response = app.client.get(f"/v1/images/{stored}/content", headers=app.auth())

    assert response.status_code == status
    assert "SECRET" not in response.text and response.json()["detail"]
    assert not internal or type(raised).__name__ in response.json()["detail"]  # internal: the type, not the text
