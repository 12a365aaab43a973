"""The REST service end to end on a real Apache Cassandra node (tests/cassandra_fixtures.py):
upload a DICOM carrying PHI, read it back de-identified, predict, list, delete, across two sites;
keys and predictions live in the same keyspace."""

from __future__ import annotations

import io

import pydicom
import pytest
from cassandra.cluster import Cluster

from anonymize.gate import is_deidentified
from tests.fixtures.anonymize_canaries import surviving_canaries
from tests.test_api_support import (
    canary_dicom,
    png_bytes,
    running_app,
    settings_for,
    upload,
)


@pytest.fixture(scope="module")
def app(tmp_path_factory, cassandra_keyspace):
    settings = settings_for(tmp_path_factory.mktemp("api-cassandra"), store_backend="cassandra",
                            cassandra_keyspace=cassandra_keyspace, cassandra_consistency="ONE")
    with running_app(settings) as running:
        yield running


def test_a_dicom_round_trip_on_cassandra(app):
    created = upload(app, canary_dicom())
    assert created.status_code == 201, created.text
    image_id = created.json()["image_id"]
    content = app.client.get(f"/v1/images/{image_id}/content", headers=app.auth(role="reader")).content
    assert surviving_canaries(content) == []
    assert is_deidentified(pydicom.dcmread(io.BytesIO(content)))

    prediction = app.client.post(f"/v1/images/{image_id}/predictions", json={"variant": "int8_dynamic"},
                                 headers=app.auth(role="uploader"))
    assert prediction.status_code == 201 and prediction.json()["variant"] == "int8_dynamic"
    history = app.client.get(f"/v1/images/{image_id}/predictions", headers=app.auth(role="reader")).json()
    assert [p["prediction_id"] for p in history["predictions"]] == [prediction.json()["prediction_id"]]
    listed = app.client.get("/v1/images", headers=app.auth(role="reader")).json()["images"]
    assert image_id in [image["image_id"] for image in listed]

    assert app.client.get(f"/v1/images/{image_id}", headers=app.auth("site-b", "admin")).status_code == 404
    assert app.client.delete(f"/v1/images/{image_id}", headers=app.auth("site-b", "admin")).status_code == 404
    assert app.client.delete(f"/v1/images/{image_id}", headers=app.auth()).status_code == 204
    assert app.client.get(f"/v1/images/{image_id}/predictions", headers=app.auth()).status_code == 404
    assert app.client.get(f"/v1/images/{image_id}", headers=app.auth()).status_code == 404


def test_predict_in_one_call_and_the_keyspace_holds_only_hashes_and_ciphertext(app, cassandra_keyspace):
    response = upload(app, png_bytes(), site="site-b", filename="x.png", path="/v1/predict")
    assert response.status_code == 201, response.text
    assert app.client.get("/readyz").json()["status"] == "ready"
    cluster = Cluster(["127.0.0.1"], port=9042, protocol_version=4)
    try:
        session = cluster.connect(cassandra_keyspace)
        hashes = [row.key_hash for row in session.execute("SELECT key_hash FROM api_keys")]
        predictions = list(session.execute("SELECT document FROM predictions"))
    finally:
        cluster.shutdown()
    assert len(hashes) >= 6 and all(len(value) == 64 for value in hashes)
    assert not any(key.split("_")[-1] in hashes for key in app.keys.values())
    # Predictions are health data: sealed with their image's data key, like the image.
    assert predictions and all(row.document.startswith("sealed:v1:") for row in predictions)
    assert not any(response.json()["prediction"]["prediction_id"] in row.document for row in predictions)
