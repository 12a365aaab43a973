"""clients.flower_processes: a message the SuperNode drops is answered, so the site keeps serving.

Flower's own NodeState and ObjectStore, Flower's own `_pull_and_store_message`; only the
SuperLink side (receive, pull_object) is played by the test.
"""

from __future__ import annotations

import functools
import threading

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate import NodeStateFactory

from clients.flower_processes import _answering_dropped_messages

RUN_ID, NODE_ID = 42, 7


@pytest.fixture
def node(monkeypatch):
    """A SuperNode's state and store, its run known, and pulls that give up after 3 quick tries."""
    pull_objects = start_client_internal.pull_objects
    monkeypatch.setattr(start_client_internal, "pull_objects", functools.partial(
        getattr(pull_objects, "func", pull_objects), max_tries_per_object=3, initial_backoff=0.001, backoff_cap=0.001))
    factory = ObjectStoreFactory()
    state = NodeStateFactory(factory).state()
    state.set_node_id(NODE_ID)
    state.store_run(Run.create_empty(RUN_ID))
    return state, factory.store()


def _message() -> Message:
    message = Message(RecordDict({"config": ConfigRecord({"round": 2})}), dst_node_id=NODE_ID, message_type="train")
    message.metadata.__dict__["_run_id"] = RUN_ID
    with no_object_id_recompute():
        message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _pull(pull_and_store, state, store, message: Message, pull_object) -> int | None:
    once = [(message, get_object_tree(message))]
    return pull_and_store(state=state, object_store=store, node_config={}, receive=lambda: once.pop() if once else None,
                          get_run=None, get_fab=None, pull_object=pull_object,
                          confirm_message_received=lambda *_: None, trusted_entities=None)


def _missing(_run_id: int, object_id: str) -> bytes:
    raise ObjectUnavailableError(object_id)


def test_flower_drops_a_message_it_cannot_pull_yet_leaves_its_supernode_waiting_for_a_reply(node):
    # The upstream behaviour the wrapper exists for: if this fails, Flower fixed it; drop the wrapper.
    state, store = node
    assert _pull(start_client_internal._pull_and_store_message, state, store, _message(), _missing) == RUN_ID
    assert state.get_messages(is_reply=True) == []  # its loop now waits for a reply that never comes


def test_a_message_whose_objects_cannot_be_pulled_is_answered_with_an_error_reply(node):
    state, store = node
    message = _message()
    wrapped = _answering_dropped_messages(start_client_internal._pull_and_store_message,
                                          start_client_internal._insert_message)

    assert _pull(wrapped, state, store, message, _missing) == RUN_ID

    # The SuperNode's next step, Flower's own `_push_messages`, now has a reply to send and returns.
    sent, pushed = [], []
    pusher = threading.Thread(target=start_client_internal._push_messages, daemon=True, kwargs={
        "state": state, "object_store": store, "push_object": lambda *call: pushed.append(call),
        "send": lambda reply, tree, runtime: sent.append((reply, runtime)) or {tree.object_id}})
    pusher.start()
    pusher.join(timeout=10)
    assert not pusher.is_alive(), "the SuperNode still waits for a reply"
    [(reply, runtime)] = sent
    assert reply.metadata.reply_to_message_id == message.metadata.message_id and reply.metadata.run_id == RUN_ID
    assert reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE and "could not receive" in reply.error.reason
    assert runtime == pytest.approx(0.0, abs=1.0) and [call[1] for call in pushed] == [reply.metadata.message_id]


def test_a_message_received_whole_is_left_to_the_client_app(node):
    state, store = node
    message = _message()
    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    wrapped = _answering_dropped_messages(start_client_internal._pull_and_store_message,
                                          start_client_internal._insert_message)

    assert _pull(wrapped, state, store, message, lambda _run_id, object_id: objects[object_id]) == RUN_ID

    assert state.get_messages(is_reply=True) == []
    [stored] = state.get_messages(is_reply=False)  # what the ClientApp pulls next
    assert stored.metadata.message_id == message.metadata.message_id
