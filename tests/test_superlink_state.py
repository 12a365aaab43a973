"""The SuperLink's state (`server.superlink_state`): enrolments outlive the process, nothing else.

Flower's own state classes, driven as its Control and Fleet APIs drive them; the restart of a
real SuperLink with real sites is `tests/test_deployment.py`.
"""

from __future__ import annotations

import json
import time

import pytest
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.constant import NodeStatus
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

import server.superlink_state as superlink_state
from server.superlink_state import EnrolmentKeepingLinkState, EnrolmentsFileError, read_enrolments

KEY_A, KEY_B = b"public key of site A", b"public key of site B"


def state_at(path, **kwargs) -> EnrolmentKeepingLinkState:
    return EnrolmentKeepingLinkState(path, NoOpFederationManager(), ObjectStoreFactory().store(), **kwargs)


def enrol(state, key: bytes) -> int:  # as `flwr supernode register` does, through the Control API
    return state.create_node(owner_aid="operator", owner_name="it", public_key=key, heartbeat_interval=30)


def test_a_restarted_state_knows_every_enrolled_site_by_its_old_node_id(tmp_path):
    path = tmp_path / "enrolments.json"
    first = state_at(path)
    a, b = enrol(first, KEY_A), enrol(first, KEY_B)
    first.delete_node("operator", b)

    again = state_at(path)

    assert again.get_node_id_by_public_key(KEY_A) == a
    assert again.get_node_id_by_public_key(KEY_B) is None  # unenrolled stays unenrolled
    with pytest.raises(ValueError):
        enrol(again, KEY_B)  # and its key cannot come back under a new id, as in Flower's own states
    assert {node.node_id: node.status for node in again.get_node_info()} == {
        a: NodeStatus.REGISTERED, b: NodeStatus.UNREGISTERED}


def test_a_site_online_when_the_superlink_stopped_counts_as_online_for_one_heartbeat_patience(tmp_path):
    # As Flower's SQLite state has it: the sites reconnect by themselves, and a run submitted right
    # after the restart must see every site that was there before it.
    path = tmp_path / "enrolments.json"
    first = state_at(path)
    node_id = enrol(first, KEY_A)
    assert first.activate_node(node_id, heartbeat_interval=30)

    started = time.time()
    again = state_at(path)

    [node] = again.get_node_info()
    assert node.status == NodeStatus.ONLINE and node.last_activated_at
    assert started + 2 * 30 <= node.online_until <= time.time() + 2 * 30
    assert again.acknowledge_node_heartbeat(node_id, heartbeat_interval=30)  # the SuperNode's next heartbeat


def test_a_site_whose_heartbeats_stopped_is_offline_after_a_restart(tmp_path):
    path = tmp_path / "enrolments.json"
    first = state_at(path)
    node_id = enrol(first, KEY_A)
    first.activate_node(node_id, heartbeat_interval=30)
    first.nodes[node_id].online_until = time.time() - 1  # its last heartbeat ran out (Flower's own tagging)
    assert first.get_node_info()[0].status == NodeStatus.OFFLINE

    [node] = state_at(path).get_node_info()

    assert node.status == NodeStatus.OFFLINE
    assert first.acknowledge_node_heartbeat(node_id, heartbeat_interval=30)  # it comes back: written too
    assert state_at(path).get_node_info()[0].status == NodeStatus.ONLINE


def test_runs_and_messages_are_not_kept(tmp_path):
    path = tmp_path / "enrolments.json"
    first = state_at(path)
    enrol(first, KEY_A)
    run_id = first.create_run("mammofl/app", "1.0.0", "hash", {}, "", None, "operator", "serverapp")

    assert run_id in first.get_run_status({run_id})
    assert state_at(path).get_run_status({run_id}) == {}
    assert set(json.loads(path.read_text())) == {"format", "nodes"}


def test_an_enrolment_that_cannot_be_written_is_refused_and_leaves_no_trace(tmp_path, monkeypatch):
    path = tmp_path / "enrolments.json"
    state = state_at(path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(superlink_state, "write_enrolments", full_disk)
    with pytest.raises(OSError):
        enrol(state, KEY_A)
    assert state.get_node_info() == [] and state.get_node_id_by_public_key(KEY_A) is None

    monkeypatch.undo()
    node_id = enrol(state, KEY_A)  # the key is free to enrol once the disk is
    assert state_at(path).get_node_id_by_public_key(KEY_A) == node_id


def test_an_unenrolment_that_cannot_be_written_is_undone(tmp_path, monkeypatch):
    path = tmp_path / "enrolments.json"
    state = state_at(path)
    node_id = enrol(state, KEY_A)

    monkeypatch.setattr(superlink_state, "write_enrolments", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O")))
    with pytest.raises(OSError):
        state.delete_node("operator", node_id)

    assert state.get_node_id_by_public_key(KEY_A) == node_id  # as the file says


def test_a_connect_that_cannot_be_written_still_connects(tmp_path, monkeypatch, capsys):
    state = state_at(tmp_path / "enrolments.json")
    node_id = enrol(state, KEY_A)
    monkeypatch.setattr(superlink_state, "write_enrolments", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))

    assert state.activate_node(node_id, heartbeat_interval=30)
    assert "could not update" in capsys.readouterr().err


def test_a_half_written_file_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "enrolments.json"
    state = state_at(path)
    node_id = enrol(state, KEY_A)
    good = path.read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("the process died mid-write")

    monkeypatch.setattr(superlink_state.json, "dump", crash)
    with pytest.raises(RuntimeError):
        superlink_state.write_enrolments(path, [])

    assert path.read_text() == good and [p.name for p in tmp_path.iterdir()] == ["enrolments.json"]
    monkeypatch.undo()
    assert state_at(path).get_node_id_by_public_key(KEY_A) == node_id


@pytest.mark.parametrize("content", ["{not json", '{"format": 2, "nodes": []}', '{"format": 1, "nodes": [{"node_id": "x"}]}',
                                     "[]"])
def test_a_broken_enrolments_file_stops_the_superlink_naming_the_file(tmp_path, content, capsys):
    path = tmp_path / "enrolments.json"
    path.write_text(content)

    with pytest.raises(EnrolmentsFileError, match="enrolments.json"):
        read_enrolments(path)
    with pytest.raises(SystemExit) as exit_:
        superlink_state.superlink(["--enrolments", str(path), "--insecure"])
    assert str(path) in str(exit_.value)
    assert path.read_text() == content  # nothing overwritten: the operator can still restore it


def test_the_launcher_refuses_a_database_of_its_own(tmp_path):
    with pytest.raises(SystemExit, match="--database"):
        superlink_state.superlink(["--enrolments", str(tmp_path / "e.json"), "--database", "x.db"])


def test_enrolments_of_a_deployment_that_kept_sqlite_state_are_imported_once(tmp_path, capsys):
    database = tmp_path / "superlink.db"
    sqlite_state = SqlLinkState(str(database), NoOpFederationManager(), ObjectStoreFactory().store())
    sqlite_state.initialize()
    node_id = enrol(sqlite_state, KEY_A)
    path = tmp_path / "enrolments.json"

    imported = state_at(path, import_from=database)

    assert imported.get_node_id_by_public_key(KEY_A) == node_id
    assert "1 enrolment(s) imported" in capsys.readouterr().err
    assert not database.exists() and (tmp_path / "superlink.db.imported").is_file()  # read once
    imported.delete_node("operator", node_id)
    path.unlink()  # a careless operator: the unenrolled site must not come back from the old database
    assert state_at(path, import_from=database).get_node_info() == []
