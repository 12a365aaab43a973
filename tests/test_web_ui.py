"""The web front end, driven in headless Chromium against the real service.

The service runs in this process under uvicorn on a free port, built like the API tests' app
(tests/test_api_support.py: SQLite store, real keyring and de-identification secret, the tiny
fp32 and int8_dynamic models) but serving api/web/. The browser is Debian's chromium (installed
by scripts/browser.sh) driven by Playwright. Every page opens in a fresh browser context, so
nothing, the API key in sessionStorage included, leaks between tests or between two pages.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

from api.app import create_app
from api.settings import ApiSettings
from tests.fixtures.anonymize_canaries import surviving_canaries
from tests.test_api_support import canary_dicom, png_bytes, settings_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WEB_DIR = ApiSettings.model_fields["web_dir"].default
SITE = "site-a"
# A site of its own for the paging test, so the other tests' uploads do not change its pages.
PAGED_SITE = "site-b"
PAGE_SIZE = 20
TIMEOUT_MS = 20_000

@dataclass(frozen=True)
class Service:
    url: str
    admin_key: str
    paged_site_key: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    app = create_app(settings_for(tmp_path_factory.mktemp("web-ui"), web_dir=WEB_DIR))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the mammofl service did not start; its log is above")
        time.sleep(0.05)
    keys = app.state.services.keys
    admin, paged_site = keys.create(SITE, "admin", "web ui admin"), keys.create(PAGED_SITE, "uploader", "web ui pages")
    try:
        yield Service(f"http://127.0.0.1:{server.config.port}/", admin.api_key, paged_site.api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():  # `make test` installs it first; a missing browser is a failure, not a skip
        pytest.fail(f"{CHROMIUM} is missing: run scripts/browser.sh (as root) or `make test`")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Browser, service: Service) -> Iterator[Callable[[], Page]]:
    """Opens the front end in a new browser context (a separate tab's sessionStorage)."""
    contexts = []
    errors: list[str] = []

    def open_new() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(service.url)
        return page

    yield open_new
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(open_page: Callable[[], Page]) -> Page:
    return open_page()


def sign_in(page: Page, api_key: str) -> None:
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("navigation", name="Main")).to_be_visible()


def go_to(page: Page, link: str) -> None:
    page.get_by_role("navigation", name="Main").get_by_role("link", name=link, exact=True).click()


def choose_file(page: Page, name: str, data: bytes, mime_type: str) -> None:
    page.get_by_label("Image file").set_input_files({"name": name, "mimeType": mime_type, "buffer": data})


def test_an_invalid_api_key_is_refused_with_the_services_reason(page) -> None:
    page.get_by_label("API key").fill("mfk_not-a-key")
    page.get_by_role("button", name="Sign in").click()

    expect(page.get_by_role("alert")).to_contain_text("Sign-in failed: invalid API key")
    expect(page.get_by_role("alert")).to_contain_text("HTTP 401")
    expect(page.get_by_role("navigation", name="Main")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_dicom_with_phi_is_uploaded_de_identified_viewed_predicted_and_deleted(page, service, tmp_path) -> None:
    sign_in(page, service.admin_key)
    identity = page.get_by_role("region", name="Signed in as")
    expect(identity).to_contain_text(SITE)
    expect(identity).to_contain_text("admin")
    assert page.evaluate("sessionStorage.getItem('mammofl.apiKey')") == service.admin_key
    assert page.evaluate("localStorage.length") == 0
    page.reload()
    expect(identity).to_contain_text("admin")

    go_to(page, "Upload")
    choose_file(page, "canary.dcm", canary_dicom(), "application/dicom")
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.get_by_role("region", name="De-identification summary")).to_contain_text("DICOM PS3.15")
    image_id = page.get_by_role("region", name="Uploaded image").get_by_role("link").inner_text()
    assert surviving_canaries(page.content().encode()) == []

    go_to(page, "Images")
    page.get_by_role("table", name="Stored images, page 1").get_by_role("link", name=image_id).click()
    expect(page.get_by_role("img", name="De-identified rendering")).to_be_visible()
    assert page.evaluate("document.querySelector('.preview img').naturalWidth") > 0
    with page.expect_download() as download:
        page.get_by_role("button", name="Download original").click()
    assert download.value.suggested_filename == f"{image_id}.dcm"
    original = Path(download.value.path()).read_bytes()
    assert original[128:132] == b"DICM" and surviving_canaries(original) == []

    expect(page.get_by_label("Model variant")).to_have_value("fp32")
    page.get_by_label("Model variant").select_option("int8_dynamic")
    page.get_by_role("button", name="Run prediction").click()
    result = page.get_by_role("region", name="Prediction result")
    probabilities = result.get_by_role("table", name="Class probabilities")
    for name in ("normal", "benign", "malignant"):
        expect(probabilities.get_by_role("row", name=name)).to_contain_text("%")
    expect(result).to_contain_text("Predicted class:")
    expect(result).to_contain_text("int8_dynamic")
    expect(result).to_contain_text("onnxruntime")
    history = page.get_by_role("table", name="Past predictions").locator("tbody tr")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("int8_dynamic")
    page.screenshot(path=tmp_path / "image-with-prediction.png", full_page=True)
    assert (tmp_path / "image-with-prediction.png").stat().st_size > 10_000

    page.get_by_role("button", name="Delete image").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status").filter(has_text=f"Image {image_id} was deleted")).to_be_visible()
    expect(page.get_by_role("heading", name=f"Images of site {SITE}")).to_be_visible()
    expect(page.get_by_role("link", name=image_id)).to_have_count(0)


def test_upload_and_predict_disables_its_buttons_until_the_answer_comes(page, service) -> None:
    sign_in(page, service.admin_key)
    go_to(page, "Upload")
    held = []
    page.route("**/v1/predict", lambda route: held.append(route))
    choose_file(page, "scan.png", png_bytes(), "image/png")
    button = page.get_by_role("button", name="Upload and predict")
    button.click()

    expect(button).to_be_disabled()
    expect(page.get_by_role("button", name="Upload", exact=True)).to_be_disabled()
    while not held:  # the route handler runs when Playwright next dispatches events
        page.wait_for_timeout(20)
    held[0].continue_()

    expect(page.get_by_role("region", name="Prediction result")).to_be_visible()
    expect(page.get_by_role("region", name="De-identification summary")).to_contain_text("re-encoded")
    expect(button).to_be_enabled()


def test_a_file_that_is_not_an_image_shows_the_services_error(page, service) -> None:
    sign_in(page, service.admin_key)
    go_to(page, "Upload")
    choose_file(page, "referral.txt", b"Patient: ZQXFAMILY, born 1961", "text/plain")
    page.get_by_role("button", name="Upload", exact=True).click()

    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Upload failed:")
    expect(alert).to_contain_text("HTTP 4")
    expect(page.get_by_role("button", name="Upload", exact=True)).to_be_enabled()
    expect(page.get_by_role("region", name="De-identification summary")).to_have_count(0)


def test_an_unknown_image_shows_not_found(page, service) -> None:
    sign_in(page, service.admin_key)
    page.goto(f"{service.url}#/images/00000000-0000-4000-8000-000000000000")

    expect(page.get_by_role("alert")).to_contain_text("Could not load the image:")
    expect(page.get_by_role("alert")).to_contain_text("HTTP 404")


def test_the_image_list_pages_forward_and_back(page, service) -> None:
    for seed in range(PAGE_SIZE + 1):
        response = httpx.post(f"{service.url}v1/images", files={"file": ("scan.png", png_bytes(seed=seed), "image/png")},
                              headers={"Authorization": f"Bearer {service.paged_site_key}"}, timeout=60)
        assert response.status_code == 201, response.text
    sign_in(page, service.paged_site_key)
    previous = page.get_by_role("button", name="Previous page")
    following = page.get_by_role("button", name="Next page")

    first_page = page.get_by_role("table", name="Stored images, page 1").locator("tbody tr")
    expect(first_page).to_have_count(PAGE_SIZE)
    first_image = first_page.first.get_by_role("link").inner_text()
    expect(previous).to_be_disabled()
    following.click()
    expect(page.get_by_role("table", name="Stored images, page 2").locator("tbody tr")).to_have_count(1)
    expect(following).to_be_disabled()
    previous.click()
    expect(first_page.first.get_by_role("link")).to_have_text(first_image)


def test_the_models_page_lists_the_served_variants_with_their_metrics(page, service) -> None:
    sign_in(page, service.admin_key)
    go_to(page, "Models")

    table = page.get_by_role("table", name="Served model variants")
    expect(table.get_by_role("row", name="fp32 (default)")).to_contain_text("pytorch")
    expect(table.get_by_role("row", name="int8_dynamic")).to_contain_text("onnxruntime")
    expect(table.get_by_role("columnheader", name="Macro AUC")).to_be_visible()
    expect(table.get_by_role("row", name="fp32 (default)")).to_contain_text("0.6000")


def test_an_uploader_cannot_manage_keys_and_is_signed_out_when_its_key_is_revoked(open_page, service,
                                                                                   tmp_path) -> None:
    admin = open_page()
    sign_in(admin, service.admin_key)
    go_to(admin, "API keys")
    admin.get_by_label("Role").select_option("uploader")
    admin.get_by_label("Key name").fill("reading room 2")
    admin.get_by_role("button", name="Create key").click()
    uploader_key = admin.get_by_label("New API key").input_value()
    assert uploader_key.startswith("mfk_")

    uploader = open_page()
    sign_in(uploader, uploader_key)
    expect(uploader.get_by_role("region", name="Signed in as")).to_contain_text("uploader")
    expect(uploader.get_by_role("link", name="API keys")).to_be_hidden()
    uploader.goto(f"{service.url}#/keys")
    expect(uploader.get_by_text("Managing API keys needs the admin role")).to_be_visible()
    expect(uploader.get_by_role("button", name="Create key")).to_have_count(0)
    uploader.screenshot(path=tmp_path / "uploader-keys-page.png", full_page=True)

    admin.get_by_role("button", name="Revoke key reading room 2").click()
    admin.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    expect(admin.get_by_role("status").filter(has_text="was revoked")).to_be_visible()
    # The revoked key stays listed, marked revoked and without a Revoke button (audit lines name it).
    revoked_row = admin.get_by_role("row").filter(has_text="reading room 2")
    expect(revoked_row).to_contain_text("revoked")
    expect(admin.get_by_role("button", name="Revoke key reading room 2")).to_have_count(0)

    go_to(uploader, "Models")
    expect(uploader.get_by_role("alert")).to_contain_text("the service no longer accepts this API key")
    expect(uploader.get_by_role("button", name="Sign in")).to_be_visible()
    assert uploader.evaluate("sessionStorage.length") == 0
