"""The site worker and its wire format: a Flower Message and Context survive the trip exactly; the
worker refuses callers without its token, answers the real ClientApp's errors as errors, and
stops with its SuperNode. The deployment tests run whole rounds through it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.thin_app import WorkerUnavailable, forward
from clients.worker_protocol import (
    ProtocolError,
    decode_call,
    encode_call,
    receive_frame,
    send_frame,
)

REPO = Path(__file__).resolve().parents[1]


def a_message() -> tuple[Message, Context]:
    content = RecordDict({
        "arrays": ArrayRecord([np.arange(12, dtype=np.float32).reshape(3, 4), np.array([7], dtype=np.int64)]),
        "config": ConfigRecord({"server-round": 3, "lr": 0.25, "name": "r", "flag": True, "blob": b"\x00\xff",
                                "blobs": [b"a", b"bc"], "floats": [1.0, 2.5]}),
        "metrics": MetricRecord({"loss": 0.5, "n": 2, "series": [1, 2]}),
    })
    message = Message(content, dst_node_id=11, message_type="train", group_id="7")
    state = RecordDict({"secaggplus": ConfigRecord({"stage": "setup", "keys": [b"k1", b"k2"]})})
    context = Context(run_id=5, node_id=11, node_config={"site-id": "site-01", "state-dir": "/x"}, state=state,
                      run_config={"config-json": "{}", "run-dir": ""})
    return message, context


def test_a_message_and_its_context_survive_the_wire_exactly():
    message, context = a_message()
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, *encode_call(message, context))
        header, buffers = receive_frame(right)
    received, received_context = decode_call(header, buffers)

    assert received.metadata.message_type == "train" and received.metadata.dst_node_id == 11
    assert received.metadata.group_id == "7" and received.metadata.created_at == message.metadata.created_at
    arrays = received.content["arrays"].to_numpy_ndarrays()
    assert np.array_equal(arrays[0], np.arange(12, dtype=np.float32).reshape(3, 4)) and arrays[1].dtype == np.int64
    assert dict(received.content["config"]) == dict(message.content["config"])
    assert dict(received.content["metrics"]) == dict(message.content["metrics"])
    assert isinstance(received.content["metrics"], MetricRecord)
    assert dict(received_context.state["secaggplus"]) == {"stage": "setup", "keys": [b"k1", b"k2"]}
    assert (received_context.run_id, dict(received_context.node_config)) == (5, dict(context.node_config))


def test_a_frame_that_is_not_ours_is_refused():
    left, right = socket.socketpair()
    with left, right:
        left.sendall((0).to_bytes(8, "big") + (2).to_bytes(8, "big") + b"{}")
        with pytest.raises(ProtocolError, match="not a mammofl-site-worker/1 frame"):
            receive_frame(right)


def test_outside_a_deployed_site_the_thin_app_does_not_start_a_worker():
    message, context = a_message()
    context.node_config = {"partition-id": 0}

    with pytest.raises(WorkerUnavailable, match="no state-dir"):
        forward(message, context)


@pytest.fixture
def worker(tmp_path):
    """A worker tied to a stand-in SuperNode (a sleeping process), serving this checkout."""
    site = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    info = tmp_path / "worker.json"
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "clients.site_worker", "--app-dir", str(REPO), "--info",
                                str(info), "--site-pid", str(site.pid), "--request-timeout", "2"],
                               cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while not info.is_file():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
        time.sleep(0.05)
    yield json.loads(info.read_text()), site, process, info
    for child in (process, site):
        child.kill()
        child.wait()
    log.close()


def call(info: dict, token: str, message: Message, context: Context) -> tuple[dict, list[bytes]]:
    header, buffers = encode_call(message, context)
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=30) as connection:
        send_frame(connection, {"token": token, **header}, buffers)
        return receive_frame(connection)


def test_the_worker_answers_only_its_token_holder_and_reports_the_apps_errors(worker):
    info, _, _, path = worker
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    message, context = a_message()
    query = Message(RecordDict(), dst_node_id=11, message_type="query")

    with pytest.raises(ProtocolError):  # a caller without the token gets no answer at all
        call(info, "0" * 64, query, context)
    answer, _ = call(info, info["token"], query, context)

    assert answer["error"]["type"] == "ValueError" and "No query function registered" in answer["error"]["message"]


def test_a_caller_that_sends_nothing_does_not_hold_the_worker(worker):
    info, _, _, _ = worker
    message, context = a_message()
    query = Message(RecordDict(), dst_node_id=11, message_type="query")
    idle = socket.create_connection(("127.0.0.1", info["port"]), timeout=5)  # connects, sends nothing

    answer, _ = call_within(info, query, context, seconds=30)

    assert answer["error"]["type"] == "ValueError"
    idle.close()


def call_within(info: dict, message: Message, context: Context, *, seconds: float):
    header, buffers = encode_call(message, context)
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=seconds) as connection:
        send_frame(connection, {"token": info["token"], **header}, buffers)
        return receive_frame(connection)


def test_the_worker_stops_at_once_when_its_supernode_is_gone(worker):
    _, site, process, _ = worker

    site.kill()
    site.wait()

    assert process.wait(timeout=10) == 0


def a_plugin(app_dir: Path):
    """Our SuperExec plugin without the SuperExec around it: only what a hand-over reads."""
    from clients.task_handoff import HandoffClientAppPlugin

    plugin = object.__new__(HandoffClientAppPlugin)
    plugin.appio_api_address, plugin.insecure, plugin.root_certificates_path = "127.0.0.1:1", True, None
    plugin._app_dirs = {5: app_dir}
    return plugin


def test_a_task_is_launched_the_flower_way_when_no_worker_runs(tmp_path, monkeypatch):
    from flwr.proto.task_pb2 import Task

    from clients.flower_processes import SITE_PID_ENV, SITE_STATE_ENV

    plugin = a_plugin(tmp_path / "app")
    task = Task(task_id=1, run_id=5)
    assert plugin._hand_over("token", task) is False  # not a deployed site's SuperExec
    monkeypatch.setenv(SITE_STATE_ENV, str(tmp_path / "state"))
    monkeypatch.setenv(SITE_PID_ENV, str(1))
    assert plugin._hand_over("token", task) is False  # no worker for this app version


def test_a_task_is_handed_to_the_running_worker_of_its_app_version(tmp_path, monkeypatch):
    from flwr.proto.task_pb2 import Task

    from clients.flower_processes import SITE_PID_ENV, SITE_STATE_ENV
    from clients.site_worker import worker_files

    app_dir = tmp_path / "flwr" / "apps" / "mammofl.mammofl.1.0.0.abcdef"
    info_path, log_path = worker_files(tmp_path / "state", app_dir)
    site = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "clients.site_worker", "--app-dir", str(REPO), "--info",
                                    str(info_path), "--site-pid", str(site.pid)], cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not info_path.is_file():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        monkeypatch.setenv(SITE_STATE_ENV, str(tmp_path / "state"))
        monkeypatch.setenv(SITE_PID_ENV, str(site.pid))

        assert a_plugin(app_dir)._hand_over("the-task-token", Task(task_id=1, run_id=5)) is True
        assert a_plugin(tmp_path / "another-version")._hand_over("t", Task(task_id=2, run_id=5)) is False
        monkeypatch.setenv(SITE_PID_ENV, str(process.pid))  # a restarted SuperNode: not this worker's
        assert a_plugin(app_dir)._hand_over("t", Task(task_id=3, run_id=5)) is False
    finally:
        for child in (process, site):
            child.kill()
            child.wait()
