"""The request guard, driven at the ASGI level so that what the service reads of a body is observable."""

import asyncio
import json
import time

from tests.test_api_support import running_app, settings_for


class Request:
    """One HTTP request whose body arrives in `chunks`, each after `delay` seconds (or when `gate` opens)."""

    def __init__(self, method, path, headers, chunks, *, delay=0.0, gate=None):
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                      "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                      "scheme": "http", "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
                      "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()]}
        self.chunks, self.delay, self.gate = list(chunks), delay, gate
        self.read = 0
        self.status = None
        self.body = b""

    async def receive(self):
        if self.read >= len(self.chunks):
            await asyncio.sleep(3600)  # the client stays connected
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        self.read += 1
        return {"type": "http.request", "body": self.chunks[self.read - 1], "more_body": self.read < len(self.chunks)}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message["headers"])
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def run(self, app):
        await app(self.scope, self.receive, self.send)
        return self


def test_an_anonymous_body_is_refused_before_a_byte_of_it_is_read(tmp_path):
    with running_app(settings_for(tmp_path)) as app:
        request = Request("POST", "/v1/keys", {"content-type": "application/json", "content-length": "60000000"},
                          [b"{" + b" " * 1_000_000] * 60)
        asyncio.run(request.run(app.client.app))
        wrong_key = Request("POST", "/v1/images", {"authorization": "Bearer mfk_0000000000000000_" + "x" * 43},
                            [b"x" * 1000])
        asyncio.run(wrong_key.run(app.client.app))
    assert request.status == 401 and request.read == 0
    assert wrong_key.status == 401 and wrong_key.read == 0


def test_a_json_body_has_a_small_limit_declared_or_streamed(tmp_path):
    with running_app(settings_for(tmp_path)) as app:
        auth = app.auth()["Authorization"]
        declared = Request("POST", "/v1/keys", {"authorization": auth, "content-type": "application/json",
                                                "content-length": str(200_000)}, [b" " * 200_000])
        streamed = Request("POST", "/v1/keys", {"authorization": auth, "content-type": "application/json"},
                           [b" " * 20_000] * 10)
        for request in (declared, streamed):
            asyncio.run(request.run(app.client.app))
    assert declared.status == 413 and declared.read == 0
    assert streamed.status == 413 and streamed.read <= 4  # refused once past 64 KiB, not read to the end
    assert "limit of 65536 bytes" in json.loads(streamed.body)["detail"]


def test_a_body_that_trickles_in_is_cut_off(tmp_path):
    with running_app(settings_for(tmp_path, body_idle_timeout_s=0.3)) as app:
        request = Request("POST", "/v1/images", {"authorization": app.auth(role="uploader")["Authorization"],
                                                 "content-type": "multipart/form-data; boundary=b"},
                          [b"--b\r\n", b"x"], delay=1.0)
        started = time.monotonic()
        asyncio.run(request.run(app.client.app))
    assert request.status == 408 and time.monotonic() - started < 5
    assert "too slowly" in json.loads(request.body)["detail"]


def test_uploads_beyond_the_concurrency_bound_are_503_not_queued(tmp_path):
    with running_app(settings_for(tmp_path, max_concurrent_uploads=1)) as app:
        headers = {"authorization": app.auth(role="uploader")["Authorization"],
                   "content-type": "multipart/form-data; boundary=b"}

        async def both():
            gate = asyncio.Event()
            first = Request("POST", "/v1/images", headers, [b"--b--\r\n"], gate=gate)
            running = asyncio.ensure_future(first.run(app.client.app))
            await asyncio.sleep(0.2)  # the first holds the only slot, its body not yet in
            second = await Request("POST", "/v1/images", headers, [b"--b--\r\n"]).run(app.client.app)
            gate.set()
            await running
            return first, second

        first, second = asyncio.run(both())
    assert second.status == 503 and second.headers[b"retry-after"] == b"5" and second.read == 0
    assert first.status != 503


def test_requests_beyond_an_addresss_rate_are_429_with_retry_after(tmp_path):
    with running_app(settings_for(tmp_path, rate_limit_per_address=60)) as app:  # bursts of 10
        answers = [app.client.get("/v1/images", headers=app.auth(role="reader")).status_code for _ in range(12)]
        limited = app.client.get("/v1/images")
        probe = app.client.get("/healthz")
    assert answers[:10] == [200] * 10 and answers[-1] == 429
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert probe.status_code == 200  # probes and the front end are not /v1


def test_a_keys_rate_is_its_own_and_an_unverified_key_id_spends_nothing(tmp_path):
    with running_app(settings_for(tmp_path, rate_limit_per_key=60)) as app:
        reader, other = app.auth(role="reader"), app.auth(site="site-b", role="reader")
        key_id = reader["Authorization"].split("_")[1]
        forged = {"Authorization": f"Bearer mfk_{key_id}_" + "x" * 43}  # the public id, a wrong secret
        for _ in range(30):
            assert app.client.get("/v1/images", headers=forged).status_code == 401
        answers = [app.client.get("/v1/images", headers=reader).status_code for _ in range(11)]
        assert app.client.get("/v1/images", headers=other).status_code == 200
    assert answers[:10] == [200] * 10 and answers[10] == 429
