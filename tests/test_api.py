"""The REST service end to end on the embedded store (SQLite): a DICOM carrying PHI goes in, comes
back de-identified, is predicted on by both served variants, listed, and deleted; the PNG path, the
one-call /v1/predict, paging, models, probes, the audit log, key management and micro-batching."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid

import numpy as np
import pydicom
import pytest
from PIL import Image

from anonymize.gate import is_deidentified
from api.inference import ModelRegistry, predict_one
from api.uploads import DICOM_TYPE, PNG_TYPE, decode_image
from common.data.images import read_image
from mammofl.cli import main
from server.compression.serving import ServingModel, load_serving_model
from tests.fixtures.anonymize_canaries import surviving_canaries
from tests.test_api_support import (
    IMAGE_SIZE,
    canary_dicom,
    png_bytes,
    running_app,
    serving_dir,
    settings_for,
    upload,
)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(settings_for(tmp_path_factory.mktemp("api"))) as running:
        yield running


def test_a_dicom_carrying_phi_is_stored_deidentified_predicted_listed_and_deleted(app):
    assert len(surviving_canaries(canary_dicom())) > 20

    created = upload(app, canary_dicom())
    assert created.status_code == 201, created.text
    info = created.json()
    image_id = info["image_id"]
    assert (info["site_id"], info["content_type"]) == ("site-a", "application/dicom")
    assert (info["width"], info["height"]) == (51, 64)
    summary = info["deidentification"]
    assert {"PatientName", "PatientID", "StudyDate"} <= set(summary["changed"])
    assert {"InstitutionName", "OperatorsName"} <= set(summary["removed"])
    assert summary["action_counts"]["removed"] > 0 and summary["method"] == "dicom-ps3.15"
    assert surviving_canaries(created.text.encode()) == []

    content = app.client.get(f"/v1/images/{image_id}/content", headers=app.auth(role="reader"))
    assert content.status_code == 200 and content.headers["content-type"] == "application/dicom"
    assert surviving_canaries(content.content) == []
    assert is_deidentified(pydicom.dcmread(io.BytesIO(content.content)))
    assert surviving_canaries(app.settings.sqlite_path.read_bytes()) == []

    rendered = app.client.get(f"/v1/images/{image_id}/content?format=png", headers=app.auth(role="reader"))
    assert rendered.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(rendered.content)).size == (51, 64)
    assert app.client.get(f"/v1/images/{image_id}", headers=app.auth(role="reader")).json() == info

    fp32 = app.client.post(f"/v1/images/{image_id}/predictions", headers=app.auth())
    int8 = app.client.post(f"/v1/images/{image_id}/predictions", json={"variant": "int8_dynamic"}, headers=app.auth())
    assert fp32.status_code == int8.status_code == 201, int8.text
    first, second = fp32.json(), int8.json()
    assert (first["variant"], first["backend"], second["variant"], second["backend"]) == (
        "fp32", "pytorch", "int8_dynamic", "onnxruntime")
    assert set(first["probabilities"]) == {"normal", "benign", "malignant"}
    assert sum(first["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert first["presence"]["probability"] == pytest.approx(1 - first["probabilities"]["normal"])
    assert first["predicted_class"] == max(first["probabilities"], key=first["probabilities"].get)
    for name, value in first["probabilities"].items():
        assert second["probabilities"][name] == pytest.approx(value, abs=0.05)
    assert first["latency_ms"] > 0 and first["model_version"].startswith("test-run/")

    history = app.client.get(f"/v1/images/{image_id}/predictions", headers=app.auth(role="reader")).json()
    assert [p["prediction_id"] for p in history["predictions"]] == [first["prediction_id"], second["prediction_id"]]
    listed = app.client.get("/v1/images", headers=app.auth(role="reader")).json()
    assert image_id in [image["image_id"] for image in listed["images"]]

    assert app.client.delete(f"/v1/images/{image_id}", headers=app.auth()).status_code == 204
    for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/content", f"/v1/images/{image_id}/predictions"):
        assert app.client.get(path, headers=app.auth()).status_code == 404
    listed = app.client.get("/v1/images", headers=app.auth(role="reader")).json()
    assert image_id not in [image["image_id"] for image in listed["images"]]


def test_the_prediction_matches_the_bare_model_on_the_same_preprocessed_image(app):
    created = upload(app, canary_dicom()).json()
    prediction = app.client.post(f"/v1/images/{created['image_id']}/predictions", headers=app.auth()).json()
    content = app.client.get(f"/v1/images/{created['image_id']}/content?format=png", headers=app.auth()).content
    pixels = np.asarray(Image.open(io.BytesIO(content)), dtype=np.float32) / 65535
    expected = predict_one(load_serving_model(serving_dir() / "fp32"), pixels)
    assert [prediction["probabilities"][name] for name in ("normal", "benign", "malignant")] == pytest.approx(
        expected.tolist(), abs=1e-3)


@pytest.mark.parametrize(("content_type", "suffix"), [(DICOM_TYPE, ".dcm"), (PNG_TYPE, ".png")])
def test_stored_bytes_decode_in_memory_exactly_as_the_file_reads(tmp_path, content_type, suffix):
    data = canary_dicom() if content_type == DICOM_TYPE else png_bytes()
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    assert np.array_equal(decode_image(data, content_type), read_image(path))


def test_predict_in_one_call_stores_a_png_without_its_metadata(app):
    response = upload(app, png_bytes(), filename="scan.png", path="/v1/predict", variant="int8_dynamic")
    assert response.status_code == 201, response.text
    body = response.json()
    image_id = body["image"]["image_id"]
    assert body["image"]["content_type"] == "image/png" and body["prediction"]["variant"] == "int8_dynamic"
    assert body["image"]["deidentification"]["method"] == "raster-reencode"
    content = app.client.get(f"/v1/images/{image_id}/content", headers=app.auth()).content
    assert b"ZQXPNGPATIENT" in png_bytes() and b"ZQXPNGPATIENT" not in content
    assert Image.open(io.BytesIO(content)).info == {}
    history = app.client.get(f"/v1/images/{image_id}/predictions", headers=app.auth()).json()["predictions"]
    assert [p["prediction_id"] for p in history] == [body["prediction"]["prediction_id"]]


def test_a_jpeg_with_exif_is_stored_as_a_bare_png(app):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "ZQXJPEGPATIENT"  # ImageDescription
    Image.open(io.BytesIO(png_bytes())).convert("RGB").save(buffer, format="JPEG", exif=exif)
    assert b"ZQXJPEGPATIENT" in buffer.getvalue()
    response = upload(app, buffer.getvalue(), filename="scan.jpg")
    assert response.status_code == 201, response.text
    assert response.json()["deidentification"]["changed"][0] == "re-encoded from JPEG as a bare PNG"
    content = app.client.get(f"/v1/images/{response.json()['image_id']}/content", headers=app.auth()).content
    assert content.startswith(b"\x89PNG") and b"ZQXJPEGPATIENT" not in content


def test_listing_pages_through_the_site_without_repeats(app):
    ids = {upload(app, png_bytes(seed=seed), site="site-b", filename="x.png").json()["image_id"] for seed in range(3)}
    seen, token = [], None
    while True:
        query = {"page_size": 2} | ({"page_token": token} if token else {})
        page = app.client.get("/v1/images", params=query, headers=app.auth("site-b", "reader")).json()
        assert len(page["images"]) <= 2
        seen += [image["image_id"] for image in page["images"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen)) and ids <= set(seen)


def test_models_lists_both_variants_with_their_metrics_and_sizes(app):
    body = app.client.get("/v1/models", headers=app.auth(role="reader")).json()
    assert body["default"] == "fp32"
    models = {model["variant"]: model for model in body["models"]}
    assert set(models) == {"fp32", "int8_dynamic"}
    assert models["int8_dynamic"]["backend"] == "onnxruntime" and models["fp32"]["input_size"] == IMAGE_SIZE
    assert models["fp32"]["size_bytes"] == (serving_dir() / "fp32" / "model.pt").stat().st_size
    assert models["fp32"]["metrics"] == {"accuracy": 0.5, "macro_auc": 0.6}
    card = models["fp32"]["card"]
    assert card["privacy_checks_passed"] is True and card["max_site_epsilon"] == 7.5
    assert card["privacy_unit"] == "image" and card["audit_epsilon_lower_bound"] == 0.2


def test_a_variants_whole_card_is_served_and_an_unknown_variant_is_a_404(app):
    card = app.client.get("/v1/models/int8_dynamic/card", headers=app.auth(role="reader"))
    assert card.status_code == 200
    assert card.json() == json.loads((serving_dir() / "int8_dynamic" / "model_card.json").read_text())
    missing = app.client.get("/v1/models/nope/card", headers=app.auth(role="reader"))
    assert missing.status_code == 404 and "fp32" in missing.json()["detail"]
    assert app.client.get("/v1/models/fp32/card").status_code == 401


def test_a_variant_without_a_card_or_with_failed_checks_is_not_served_unless_allowed(tmp_path, caplog):
    import shutil

    from api.inference import load_registry
    from common.errors import ConfigError
    from tests.test_api_support import card_for

    shutil.copytree(serving_dir() / "fp32", tmp_path / "fp32")
    (tmp_path / "fp32" / "model_card.json").unlink()
    with pytest.raises(ConfigError, match="no model_card.json"):
        load_registry(tmp_path)
    served = json.loads((tmp_path / "fp32" / "metadata.json").read_text())["sha256"]
    (tmp_path / "fp32" / "model_card.json").write_text(json.dumps(card_for("fp32", "0" * 64)))
    with pytest.raises(ConfigError, match="not the served file"):
        load_registry(tmp_path)  # a card of another model file
    (tmp_path / "fp32" / "model_card.json").write_text(json.dumps(card_for("fp32", served, passed=False)))
    with pytest.raises(ConfigError, match="privacy checks failed.*exceeded its budget"):
        load_registry(tmp_path)

    with caplog.at_level("WARNING", logger="api.inference"):
        registry = load_registry(tmp_path, allow_unchecked=True)
    assert registry.cards["fp32"]["privacy_checks"]["passed"] is False
    assert "privacy checks FAILED" in caplog.text
    registry.close()


def test_probes_and_prometheus_metrics(app):
    upload(app, png_bytes(), filename="x.png", path="/v1/predict")
    assert app.client.get("/healthz").json() == {"status": "ok"}
    ready = app.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["fp32", "int8_dynamic"]
    metrics = app.client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'mammofl_predictions_total{variant="fp32"}' in metrics.text
    assert 'route="/v1/predict",status="201"' in metrics.text


def test_the_audit_log_says_who_did_what_without_phi_or_keys(app):
    created = upload(app, canary_dicom()).json()
    app.client.get("/v1/images", headers={"Authorization": "Bearer mfk_0000000000000000_" + "x" * 43})
    text = app.settings.audit_log_path.read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    mine = [e for e in entries if e["resource_id"] == created["image_id"] and e["action"] == "POST /v1/images"]
    assert len(mine) == 1 and mine[0]["status"] == 201 and mine[0]["site_id"] == "site-a"
    assert mine[0]["role"] == "uploader" and len(mine[0]["key_id"]) == 16
    assert any(e["status"] == 401 and e["key_id"] is None for e in entries)
    assert surviving_canaries(text.encode()) == []
    # A key is mfk_<key id>_<secret>, and the url-safe secret may itself hold "_": split twice only
    # (the last "_"-piece alone can be a character or two, found in any log by chance).
    assert not any(key.split("_", 2)[2] in text for key in app.keys.values())


def test_an_admin_issues_lists_and_revokes_its_own_sites_keys(app):
    issued = app.client.post("/v1/keys", json={"site_id": "site-a", "role": "reader", "name": "viewer"},
                             headers=app.auth()).json()
    headers = {"Authorization": f"Bearer {issued['api_key']}"}
    assert app.client.get("/v1/whoami", headers=headers).json() == {
        "key_id": issued["key_id"], "site_id": "site-a", "role": "reader"}
    listed = app.client.get("/v1/keys", headers=app.auth()).json()["keys"]
    assert issued["key_id"] in [key["key_id"] for key in listed]
    assert {key["site_id"] for key in listed} == {"site-a"} and "api_key" not in listed[0]
    other = app.client.post("/v1/keys", json={"site_id": "site-b", "role": "admin", "name": "x"}, headers=app.auth())
    assert other.status_code == 403
    site_b_key = app.client.get("/v1/whoami", headers=app.auth("site-b", "reader")).json()["key_id"]
    assert app.client.delete(f"/v1/keys/{site_b_key}", headers=app.auth()).status_code == 404
    assert app.client.delete(f"/v1/keys/{issued['key_id']}", headers=app.auth()).status_code == 204
    assert app.client.get("/v1/whoami", headers=headers).status_code == 401


def test_api_keys_command_creates_lists_and_revokes(tmp_path, monkeypatch, capsys):
    settings = settings_for(tmp_path)
    env = tmp_path / "api.env"
    env.write_text(f"MAMMOFL_API_SQLITE_PATH={settings.sqlite_path}\nMAMMOFL_API_KEYRING_PATH={settings.keyring_path}\n")
    assert main(["api-keys", "create", "--env-file", str(env), "--site", "site-z", "--role", "admin",
                 "--name", "bootstrap"]) == 0
    created = capsys.readouterr().out
    key_id = created.split()[1]
    api_key = created.strip().split()[-1]
    assert api_key.startswith(f"mfk_{key_id}_")
    assert main(["api-keys", "list", "--env-file", str(env)]) == 0
    assert key_id in capsys.readouterr().out
    assert main(["api-keys", "revoke", "--env-file", str(env), key_id]) == 0
    capsys.readouterr()
    assert main(["api-keys", "list", "--env-file", str(env)]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if key_id in line]
    assert len(listed) == 1 and " revoked " in listed[0]  # kept, so audit lines keep their holder
    assert main(["api-keys", "revoke", "--env-file", str(env), key_id]) == 2


def test_revoked_and_expired_keys_stop_working_and_use_is_recorded(tmp_path, monkeypatch):
    from datetime import datetime, timedelta, timezone

    with running_app(settings_for(tmp_path)) as running:
        keys = running.services.keys
        issued = running.client.post("/v1/keys", headers=running.auth(), json={
            "site_id": "site-a", "role": "reader", "name": "short-lived", "expires_in_days": 1}).json()
        bearer = {"Authorization": f"Bearer {issued['api_key']}"}
        assert running.client.get("/v1/whoami", headers=bearer).status_code == 200
        listed = {key["key_id"]: key for key in running.client.get("/v1/keys", headers=running.auth()).json()["keys"]}
        assert listed[issued["key_id"]]["last_used_at"] is not None
        assert listed[issued["key_id"]]["expires_at"] == issued["expires_at"]

        later = datetime.now(timezone.utc) + timedelta(days=2)
        monkeypatch.setattr("api.auth.datetime", type("Later", (datetime,), {"now": staticmethod(lambda tz=None: later)}))
        assert running.client.get("/v1/whoami", headers=bearer).status_code == 401  # expired
        monkeypatch.undo()

        other = keys.create("site-a", "reader", "to revoke")
        assert keys.verify(other.api_key) is not None
        assert running.client.delete(f"/v1/keys/{other.record.key_id}", headers=running.auth()).status_code == 204
        assert keys.verify(other.api_key) is None
        kept = {key["key_id"]: key for key in running.client.get("/v1/keys", headers=running.auth()).json()["keys"]}
        assert kept[other.record.key_id]["revoked_at"] is not None
        assert running.client.delete(f"/v1/keys/{other.record.key_id}", headers=running.auth()).status_code == 404


def test_a_bad_setting_is_one_clear_error_naming_its_variable(tmp_path, capsys):
    env = tmp_path / "api.env"
    env.write_text("MAMMOFL_API_STORE_BACKEND=mongo\nMAMMOFL_API_UPLOAD_LIMIT=3\n")
    assert main(["api-keys", "list", "--env-file", str(env)]) == 2
    error = capsys.readouterr().err
    assert "MAMMOFL_API_STORE_BACKEND" in error and "'sqlite' or 'cassandra'" in error
    assert "MAMMOFL_API_UPLOAD_LIMIT: Extra inputs are not permitted" in error


class _CountingModel:
    """Wraps a served model and records the batch sizes it is called with."""

    def __init__(self, model: ServingModel) -> None:
        self.model, self.batch_sizes = model, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(batch))
        time.sleep(0.02)
        return self.model.predict(batch)


def test_micro_batching_groups_concurrent_requests_and_keeps_each_answer():
    served = load_serving_model(serving_dir() / "fp32")
    counting = _CountingModel(served)
    registry = ModelRegistry({"fp32": ServingModel(served.metadata, counting)}, "fp32", micro_batch_size=8,
                             micro_batch_wait_ms=50)
    rng = np.random.default_rng(0)
    images = [rng.random((64, 52), dtype=np.float32) for _ in range(6)]

    async def all_at_once():
        return await asyncio.gather(*(registry.predict(None, image) for image in images))

    try:
        results = asyncio.run(all_at_once())
    finally:
        registry.close()
    assert max(counting.batch_sizes) > 1 and sum(counting.batch_sizes) == len(images)
    for image, result in zip(images, results):
        expected = predict_one(served, image)
        assert [result.probabilities[name] for name in served.metadata.class_names] == pytest.approx(
            expected.tolist(), abs=1e-5)


def test_cors_is_off_by_default(app):
    response = app.client.get("/healthz", headers={"Origin": "https://viewer.example"})
    assert "access-control-allow-origin" not in response.headers


def test_the_web_front_end_is_served_at_the_root_and_cors_when_configured(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<html>mammofl viewer</html>")
    settings = settings_for(tmp_path, web_dir=web, cors_origins=("https://viewer.example",))
    with running_app(settings) as running:
        assert "mammofl viewer" in running.client.get("/").text
        assert running.client.get("/v1/whoami").status_code == 401
        assert running.client.get("/openapi.json").json()["info"]["title"] == "mammofl inference service"
        preflight = running.client.options("/v1/images", headers={
            "Origin": "https://viewer.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization"})
        assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"


def test_a_random_image_id_is_unknown(app):
    assert app.client.get(f"/v1/images/{uuid.uuid4()}", headers=app.auth()).status_code == 404


def test_the_audit_log_is_created_readable_by_its_owner_only(tmp_path):
    from api.audit import AuditLog

    log = AuditLog(tmp_path / "api" / "audit.jsonl")
    log.record(action="GET /v1/models", status=200, key_id="k", site_id="site-a", role="reader")

    assert oct((tmp_path / "api").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "api" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_responses_carry_security_headers_api_answers_are_never_cached_and_docs_are_off(app):
    created = upload(app, png_bytes(seed=3)).json()
    content = app.client.get(f"/v1/images/{created['image_id']}/content", headers=app.auth(role="reader"))
    issued = app.client.post("/v1/keys", json={"site_id": "site-a", "role": "reader", "name": "cache check"},
                             headers=app.auth())
    page = app.client.get("/healthz")
    for response in (content, issued):
        assert response.headers["cache-control"] == "no-store"
    for response in (content, issued, page):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert app.client.get("/docs").status_code == 404  # Swagger UI would load a CDN's scripts
    assert app.client.get("/openapi.json").status_code == 200


def test_invented_methods_share_one_metrics_label(app):
    for method in ("FOOBAR1", "FOOBAR2"):
        app.client.request(method, "/v1/images")
    text = app.client.get("/metrics").text
    assert "FOOBAR" not in text and 'method="OTHER"' in text


def test_the_audit_log_names_resources_canonically_and_takes_no_text_from_urls(app):
    created = upload(app, png_bytes(seed=4)).json()
    shouting = created["image_id"].upper()
    assert app.client.get(f"/v1/images/{shouting}", headers=app.auth(role="reader")).status_code == 200
    app.client.get("/v1/images/JOHN-SMITH-1970-01-01", headers=app.auth(role="reader"))
    text = app.settings.audit_log_path.read_text()
    assert shouting not in text and "JOHN-SMITH" not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert any(e["resource_id"] == created["image_id"] and e["action"] == "GET /v1/images/{image_id}"
               for e in entries)
    assert any(e["resource_id"] == "invalid" for e in entries)


def test_an_unhandled_error_still_leaves_its_audit_line(tmp_path):
    from tests.test_api_support import running_app, settings_for

    with running_app(settings_for(tmp_path)) as running:
        def boom():
            raise RuntimeError("unexpected")

        running.client.app.add_api_route("/v1/boom", boom)
        assert running.client.get("/v1/boom").status_code == 500
        entries = [json.loads(line) for line in running.settings.audit_log_path.read_text().splitlines()]
    assert entries[-1]["action"] == "GET /v1/boom" and entries[-1]["status"] == 500


def test_the_audit_log_is_a_hash_chain_that_shows_an_edited_or_removed_line(app, tmp_path, capsys):
    from api.audit import verify_chain

    upload(app, png_bytes(seed=5))
    copy = tmp_path / "audit.jsonl"
    copy.write_text(app.settings.audit_log_path.read_text())
    lines = copy.read_text().splitlines()
    assert len(lines) > 3 and verify_chain(copy).broken_at is None
    assert main(["audit", "verify", str(copy)]) == 0

    edited = json.loads(lines[2]) | {"status": 200 if json.loads(lines[2])["status"] != 200 else 404}
    copy.write_text("\n".join([*lines[:2], json.dumps(edited, separators=(",", ":")), *lines[3:]]) + "\n")
    assert verify_chain(copy).broken_at == 4  # the next line no longer chains to the edited one
    copy.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    assert verify_chain(copy).broken_at == 2
    assert main(["audit", "verify", str(copy)]) == 1 and "BROKEN at line 2" in capsys.readouterr().out


def test_the_service_speaks_https_with_hsts_when_given_a_certificate(tmp_path):
    import socket
    import ssl
    import threading

    import httpx
    import uvicorn

    from api.app import create_app
    from common.certs import create_tls_files
    from tests.test_api_support import settings_for

    tls = create_tls_files(tmp_path / "tls", ["127.0.0.1"])
    settings = settings_for(tmp_path, tls_certfile=tls.server_certificate, tls_keyfile=tls.server_key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error",
                                           ssl_certfile=str(tls.server_certificate), ssl_keyfile=str(tls.server_key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ssl.create_default_context(cafile=str(tls.ca_certificate)))
        assert answer.status_code == 200 and answer.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)  # no plaintext on the TLS port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_certificate_without_its_key_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "cert.pem").write_text("x")
    assert main(["serve", "--certfile", str(tmp_path / "cert.pem")]) == 2
    assert "tls_certfile and tls_keyfile go together" in capsys.readouterr().err


def test_a_prediction_racing_a_delete_leaves_no_orphan_and_answers_404(app, monkeypatch):
    import uuid as uuid_module

    created = upload(app, png_bytes(seed=6)).json()
    image_id = uuid_module.UUID(created["image_id"])
    services = app.services
    predict = services.models.predict

    async def deleted_while_predicting(variant, pixels):
        services.images.delete("site-a", image_id)  # an admin's DELETE lands while the model runs
        services.records.delete_predictions("site-a", image_id)
        return await predict(variant, pixels)

    monkeypatch.setattr(services.models, "predict", deleted_while_predicting)
    answer = app.client.post(f"/v1/images/{image_id}/predictions", json={}, headers=app.auth(role="uploader"))

    assert answer.status_code == 404
    assert services.records.list_predictions("site-a", image_id) == []


def test_no_change_happens_without_its_audit_line(tmp_path, monkeypatch):
    with running_app(settings_for(tmp_path)) as running:
        created = upload(running, png_bytes(seed=7)).json()
        audit = running.services.audit

        def disk_full(**entry):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(audit, "record", disk_full)
        refused = running.client.delete(f"/v1/images/{created['image_id']}", headers=running.auth())
        monkeypatch.undo()
        assert refused.status_code == 503 and "nothing was done" in refused.json()["detail"]
        assert running.client.get(f"/v1/images/{created['image_id']}", headers=running.auth(role="reader")).status_code == 200

        assert running.client.delete(f"/v1/images/{created['image_id']}", headers=running.auth()).status_code == 204
        entries = [json.loads(line) for line in running.settings.audit_log_path.read_text().splitlines()]
    deletes = [e for e in entries if e["action"] == "DELETE /v1/images/{image_id}"]
    assert [e["status"] for e in deletes] == ["started", 204] and deletes[0]["resource_id"] == created["image_id"]


def test_a_refused_body_is_audited_under_its_valid_key(app):
    response = app.client.post("/v1/keys", content=b"{" + b" " * 100_000 + b"}", headers={
        **app.auth(), "Content-Type": "application/json"})
    assert response.status_code == 413
    entry = json.loads(app.settings.audit_log_path.read_text().splitlines()[-1])
    assert entry["status"] == 413 and entry["key_id"] == app.auth()["Authorization"].split("_")[1]


def test_predictions_are_stored_sealed_with_their_images_key(tmp_path):
    import sqlite3

    with running_app(settings_for(tmp_path)) as running:
        created = upload(running, png_bytes(seed=8), path="/v1/predict").json()
        listed = running.client.get(f"/v1/images/{created['image']['image_id']}/predictions",
                                    headers=running.auth(role="reader")).json()["predictions"]
        assert len(listed) == 1 and listed[0]["probabilities"] == created["prediction"]["probabilities"]
        with sqlite3.connect(running.settings.sqlite_path) as connection:
            (stored,) = connection.execute("SELECT document FROM predictions").fetchone()
        assert stored.startswith("sealed:v1:") and "probabilities" not in stored
        assert str(created["prediction"]["probabilities"]["normal"])[:6] not in stored


def test_an_upload_keeps_no_free_text_phi_found_nowhere_else_in_the_file(app):
    # The service de-identifies with the new defaults: descriptions and comments are removed, so a
    # name or number that only a comment holds never reaches the store.
    ds = pydicom.dcmread(io.BytesIO(canary_dicom()))
    ds.ImageComments = "Pt Hollowell tel 555-201-3344 MRN 8842913"
    ds.StudyDescription = "screening referred by Dr Pemberton"
    ds.PatientComments = "lives at 12 Elmwood Road"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)

    created = upload(app, buffer.getvalue())
    assert created.status_code == 201, created.text
    stored = app.client.get(f"/v1/images/{created.json()['image_id']}/content", headers=app.auth(role="reader"))

    for word in (b"Hollowell", b"3344", b"8842913", b"Pemberton", b"Elmwood"):
        assert word not in stored.content and word not in created.content
    assert {"ImageComments", "StudyDescription", "PatientComments"} <= set(created.json()["deidentification"]["removed"])
