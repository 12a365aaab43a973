"""The REST service through a real outage of the three-node Cassandra cluster (tests/cassandra_fixtures.py).

The API runs on the cluster with replication 3 and QUORUM. Two of the three nodes get SIGKILL
(through their own pid files), so that no quorum is left: an upload is 503 with Retry-After and a
message saying to retry, readiness is 503, and once the nodes are back nothing of the refused
uploads is listed and uploads succeed again.
"""

from __future__ import annotations

import time

import pytest

from tests.test_api_support import png_bytes, running_app, settings_for, upload

pytest_plugins = ["tests.cassandra_fixtures"]
pytestmark = pytest.mark.cassandra_cluster

VICTIMS = (2, 3)  # node 1 is the seed and stays up
SITE = "site-b"
RECOVERY_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def app(tmp_path_factory, cassandra_cluster, cluster_keyspace):
    settings = settings_for(tmp_path_factory.mktemp("api-cluster"), store_backend="cassandra",
                            cassandra_contact_points=cassandra_cluster.addresses,
                            cassandra_port=cassandra_cluster.port, cassandra_keyspace=cluster_keyspace,
                            cassandra_replication_factor=3, cassandra_consistency="QUORUM")
    with running_app(settings) as running:
        yield running


@pytest.fixture
def victims(cassandra_cluster):
    """The nodes to kill; brought back afterwards whatever the test did, so later tests find three nodes."""
    yield VICTIMS
    cassandra_cluster.up()


def listed_ids(app) -> set[str]:
    response = app.client.get("/v1/images", params={"page_size": 1000}, headers=app.auth(SITE, "reader"))
    assert response.status_code == 200, response.text
    return {image["image_id"] for image in response.json()["images"]}


def upload_once_the_cluster_answers(app):
    """The first upload that succeeds after the nodes restart (the survivor learns they are up by gossip)."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        response = upload(app, png_bytes(seed=9), site=SITE, filename="after.png")
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(1)


def test_without_a_quorum_uploads_are_503_nothing_is_half_stored_and_service_resumes(app, cassandra_cluster,
                                                                                      victims):
    stored = upload(app, png_bytes(seed=1), site=SITE, filename="before.png")
    assert stored.status_code == 201, stored.text
    assert app.client.get("/readyz").status_code == 200

    for node in victims:
        cassandra_cluster.kill(node)
    refused = [upload(app, png_bytes(seed=seed), site=SITE, filename="during.png") for seed in (2, 3)]
    readiness = app.client.get("/readyz")

    for response in refused:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(app.settings.retry_after_s)
        assert "unavailable" in response.json()["detail"] and "retry later" in response.json()["detail"]
    assert readiness.status_code == 503 and readiness.headers["retry-after"] == str(app.settings.retry_after_s)
    assert readiness.json()["status"] == "not ready" and readiness.json()["store"].startswith("unreachable")

    cassandra_cluster.up()
    resumed = upload_once_the_cluster_answers(app)
    assert resumed.status_code == 201, resumed.text
    assert listed_ids(app) == {stored.json()["image_id"], resumed.json()["image_id"]}
    assert app.client.get("/readyz").status_code == 200
