"""Property-based requests over the published OpenAPI schema (schemathesis): whatever the
generated path, query, headers or body, with a valid admin key or without one, no answer is a 5xx,
and every error answer is the documented ``{"detail": "<message>"}``."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.test_api_support import png_bytes, running_app, settings_for, upload

EXAMPLES_PER_OPERATION = 10


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(settings_for(tmp_path_factory.mktemp("api-schema"), max_upload_bytes=100_000)) as running:
        assert upload(running, png_bytes(), filename="x.png").status_code == 201
        yield running


def test_the_schema_documents_every_route_with_examples(app):
    document = app.client.get("/openapi.json").json()
    paths = set(document["paths"])
    assert {"/v1/images", "/v1/images/{image_id}", "/v1/images/{image_id}/content", "/v1/images/{image_id}/predictions",
            "/v1/predict", "/v1/models", "/v1/keys", "/v1/keys/{key_id}", "/v1/whoami", "/healthz", "/readyz",
            "/metrics"} <= paths
    assert "example" in str(document["components"]["schemas"]["Prediction"])
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_no_generated_request_gets_a_server_error(app):
    """Runs hypothesis per operation (the schemathesis pytest plugin does not load under this pytest)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    statuses: list[int] = []
    for operation in operations:
        check_operation(app, operation, statuses)
    assert {200, 401, 404, 415, 422} <= set(statuses)


def check_operation(app, operation, statuses: list[int]) -> None:
    """Generated requests to one operation, with an admin key and without: never a 5xx."""

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def no_server_error(case):
        for headers in (app.auth("site-a", "admin"), {}):
            response = case.call(headers={**(case.headers or {}), **headers})
            statuses.append(response.status_code)
            assert response.status_code < 500, (f"{case.method} {case.formatted_path}: {response.status_code} "
                                                 f"{response.text[:300]}")
            if response.status_code >= 400 and operation.path != "/readyz":
                assert isinstance(response.json()["detail"], str), response.text[:300]

    no_server_error()
