"""Who may do what: two sites, three roles. A key never reaches another site's images (404, as for
an id that does not exist), a role too weak gets 403, no or a bad key gets 401 with a Bearer challenge."""

from __future__ import annotations

import pytest

from tests.test_api_support import (
    ROLES,
    SITES,
    png_bytes,
    running_app,
    settings_for,
    upload,
)

RANK = {role: rank for rank, role in enumerate(ROLES)}
# operation -> (method, path template, weakest role, body)
OPERATIONS = {
    "metadata": ("GET", "/v1/images/{id}", "reader", None),
    "content": ("GET", "/v1/images/{id}/content", "reader", None),
    "predictions": ("GET", "/v1/images/{id}/predictions", "reader", None),
    "predict": ("POST", "/v1/images/{id}/predictions", "uploader", {}),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(settings_for(tmp_path_factory.mktemp("api-auth"))) as running:
        yield running


@pytest.fixture(scope="module")
def site_a_image(app) -> str:
    response = upload(app, png_bytes(), filename="a.png")
    assert response.status_code == 201
    return response.json()["image_id"]


def expected_status(site: str, role: str, weakest: str, success: int) -> int:
    if RANK[role] < RANK[weakest]:
        return 403
    return success if site == "site-a" else 404


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("site", SITES)
def test_image_operations_across_sites_and_roles(app, site_a_image, site, role, operation):
    method, template, weakest, body = OPERATIONS[operation]
    response = app.client.request(method, template.format(id=site_a_image), json=body, headers=app.auth(site, role))
    success = 201 if method == "POST" else 200
    assert response.status_code == expected_status(site, role, weakest, success), response.text
    assert isinstance(response.json()["detail"] if response.status_code >= 400 else "", str)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("site", SITES)
def test_delete_across_sites_and_roles(app, site, role):
    image_id = upload(app, png_bytes(seed=1), filename="d.png").json()["image_id"]
    response = app.client.delete(f"/v1/images/{image_id}", headers=app.auth(site, role))
    assert response.status_code == expected_status(site, role, "admin", 204)
    still_there = app.client.get(f"/v1/images/{image_id}", headers=app.auth("site-a", "reader")).status_code
    assert still_there == (404 if response.status_code == 204 else 200)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("site", SITES)
def test_listing_shows_only_the_callers_site(app, site_a_image, site, role):
    response = app.client.get("/v1/images", headers=app.auth(site, role))
    assert response.status_code == 200
    images = response.json()["images"]
    assert {image["site_id"] for image in images} <= {site}
    assert (site_a_image in [image["image_id"] for image in images]) == (site == "site-a")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("site", SITES)
def test_uploads_need_the_uploader_role_and_land_in_the_callers_site(app, site, role):
    for path in ("/v1/images", "/v1/predict"):
        response = upload(app, png_bytes(seed=2), site=site, role=role, filename="u.png", path=path)
        assert response.status_code == (403 if role == "reader" else 201)
        if response.status_code == 201:
            body = response.json()
            assert body.get("image", body)["site_id"] == site


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("site", SITES)
def test_key_management_is_for_admins_and_whoami_for_everyone(app, site, role):
    listing = app.client.get("/v1/keys", headers=app.auth(site, role))
    assert listing.status_code == (200 if role == "admin" else 403)
    assert app.client.get("/v1/whoami", headers=app.auth(site, role)).json()["role"] == role
    assert app.client.get("/v1/models", headers=app.auth(site, role)).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic dXNlcjpwdw=="},
                                     {"Authorization": "Bearer mfk_0123456789abcdef_" + "A" * 43}],
                         ids=["missing", "malformed", "basic", "unknown"])
@pytest.mark.parametrize("path", ["/v1/images", "/v1/whoami", "/v1/models", "/v1/keys"])
def test_without_a_valid_key_every_route_answers_401_with_a_bearer_challenge(app, headers, path):
    response = app.client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]


def test_a_key_with_a_wrong_secret_is_refused(app):
    key = app.keys[("site-a", "admin")]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert app.client.get("/v1/whoami", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_a_store_made_before_key_expiry_and_revocation_is_migrated_in_place(tmp_path):
    import sqlite3

    from api.crypto import Keyring
    from api.store.records_sqlite import SQLiteServiceRecords
    from api.store.sqlite import SQLiteImageStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, site_id TEXT NOT NULL, role TEXT NOT NULL, "
                           "name TEXT NOT NULL, key_hash TEXT NOT NULL, created_at TEXT NOT NULL)")
        connection.execute("INSERT INTO api_keys VALUES ('00112233445566aa', 'site-a', 'reader', 'old', 'h', "
                           "'2026-01-01T00:00:00+00:00')")
    with SQLiteImageStore(path, Keyring.generate()) as store:
        record = SQLiteServiceRecords(store).get_key("00112233445566aa")
    assert record is not None and record.name == "old" and record.revoked_at is None and record.expires_at is None
