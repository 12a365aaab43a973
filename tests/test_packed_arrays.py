"""Packed ArrayRecords (`common.packed_arrays`): exact round trips, fewer objects, hostile layouts refused.

The federation tests (simulated and deployed) run every round through the packing both ways;
these pin the format itself and what a hostile sender can and cannot make it do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.packed_arrays import (
    LAYOUT_RECORD,
    PACKED_KEY,
    PackingError,
    pack_content,
    packed_arrays_mod,
    unpack_content,
)
from server.prompt_grid import PromptGrid


def content() -> RecordDict:
    rng = np.random.default_rng(0)
    return RecordDict({
        "arrays": ArrayRecord({"conv.weight": Array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                               "conv.bias": Array(np.zeros(4, dtype=np.float16)),
                               "steps": Array(np.array([7], dtype=np.int64)),
                               "scalar": Array(np.array(2.5))}),
        "masked": ArrayRecord({"v": Array(np.arange(5, dtype=np.uint64))}),
        "empty": ArrayRecord(),
        "config": ConfigRecord({"lr": 0.01, "names": ["a", "b"]}),
        "metrics": MetricRecord({"loss": 0.5}),
    })


def test_a_packed_content_unpacks_to_the_same_arrays_bit_for_bit():
    original = content()
    packed = pack_content(original)
    assert list(packed["arrays"].keys()) == [PACKED_KEY] and list(packed["masked"].keys()) == [PACKED_KEY]
    assert set(json.loads(packed[LAYOUT_RECORD]["arrays"])) == {"format", "arrays"}
    restored = unpack_content(packed)
    assert list(restored.keys()) == list(original.keys())
    for name in ("arrays", "masked", "empty"):
        assert list(restored[name].keys()) == list(original[name].keys())
        assert restored[name].object_id == original[name].object_id  # same dtype, shape, stype and bytes
    assert dict(restored["config"]) == dict(original["config"]) and dict(restored["metrics"]) == dict(original["metrics"])


def test_packing_cuts_the_objects_flower_moves_for_a_model_message():
    from common.config import parse_config
    from common.models.configured import classifier_from_config

    config = parse_config({"name": "objects", "encoder": "smallcnn", "model": {"image_size": 64},
                           "tracking": {"wandb_mode": "disabled"}})
    arrays = ArrayRecord(classifier_from_config(config).state_dict())
    plain = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                    message_type="train")
    packed = Message(pack_content(plain.content), dst_node_id=1, message_type="train")
    objects, packed_objects = len(get_all_nested_objects(plain)), len(get_all_nested_objects(packed))
    assert packed_objects <= 8 and objects >= 5 * packed_objects, (objects, packed_objects)


def test_content_without_a_layout_passes_as_it_is():
    original = content()
    assert unpack_content(original) is original
    assert pack_content(RecordDict({"config": ConfigRecord({"a": 1})}))[("config")]["a"] == 1


def test_a_content_that_already_uses_the_layout_name_is_refused():
    with pytest.raises(PackingError, match="already has a record named"):
        pack_content(RecordDict({LAYOUT_RECORD: ConfigRecord({"a": 1})}))


def _with_layout(packed: RecordDict, name: str, layout) -> RecordDict:
    records = dict(packed.items())
    layouts = dict(records[LAYOUT_RECORD].items())
    layouts[name] = layout if isinstance(layout, str) else json.dumps(layout)
    records[LAYOUT_RECORD] = ConfigRecord(layouts)
    return RecordDict(records)


def _layout(packed: RecordDict, name: str = "arrays") -> dict:
    return json.loads(packed[LAYOUT_RECORD][name])


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda layout: {**layout, "arrays": layout["arrays"][:-1]}, "the layout names .* bytes, the packed array holds"),
    (lambda layout: {**layout, "arrays": layout["arrays"] + [dict(layout["arrays"][0], bytes=0)]}, "names array .* twice"),
    (lambda layout: {**layout, "arrays": [dict(layout["arrays"][0], bytes=-1)] + layout["arrays"][1:]}, "a layout entry is not"),
    (lambda layout: {**layout, "arrays": [dict(layout["arrays"][0], shape=[-3])] + layout["arrays"][1:]}, "a layout entry is not"),
    (lambda layout: {**layout, "arrays": [dict(layout["arrays"][0], code="x")] + layout["arrays"][1:]}, "a layout entry is not"),
    (lambda layout: {**layout, "format": 2}, "not a format-1 layout"),
    (lambda layout: "{not json", "not JSON"),
])
def test_a_layout_that_does_not_describe_its_bytes_is_refused(tamper, message):
    packed = pack_content(content())
    with pytest.raises(PackingError, match=message):
        unpack_content(_with_layout(packed, "arrays", tamper(_layout(packed))))


def test_a_layout_for_a_record_that_is_not_packed_is_refused():
    packed = pack_content(content())
    with pytest.raises(PackingError, match="'config' has a layout but is not a packed ArrayRecord"):
        unpack_content(_with_layout(packed, "config", _layout(packed)))
    records = dict(packed.items())
    records["arrays"] = ArrayRecord({PACKED_KEY: records["arrays"][PACKED_KEY], "extra": Array(np.zeros(1))})
    with pytest.raises(PackingError, match="holding only"):
        unpack_content(RecordDict(records))


def test_a_packed_array_that_is_not_bytes_is_refused():
    packed = pack_content(content())
    records = dict(packed.items())
    records["arrays"] = ArrayRecord({PACKED_KEY: Array(np.zeros(3, dtype=np.float32))})
    with pytest.raises(PackingError, match="valid: a 1-D uint8 array"):
        unpack_content(RecordDict(records))


def test_the_client_mod_hands_the_app_arrays_and_packs_its_reply():
    from flwr.app import Context

    message = Message(pack_content(content()), dst_node_id=1, message_type="train")
    seen = {}

    def app(incoming: Message, context: Context) -> Message:
        seen["keys"] = list(incoming.content["arrays"].keys())
        return Message(RecordDict({"arrays": incoming.content["arrays"], "metrics": MetricRecord({"n": 1})}),
                       reply_to=incoming)

    reply = packed_arrays_mod(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                              app)
    assert seen["keys"] == ["conv.weight", "conv.bias", "steps", "scalar"]
    assert list(reply.content["arrays"].keys()) == [PACKED_KEY] and LAYOUT_RECORD in reply.content
    assert reply.metadata.reply_to_message_id == message.metadata.message_id


class RecordingGrid:
    """A stand-in grid for the wrapper's own logic: what was pushed, and the replies it is told to return."""

    def __init__(self, replies: list[Message]) -> None:
        self.pushed: list[Message] = []
        self.replies = replies

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"id-{index}" for index, _ in enumerate(self.pushed)]

    def pull_messages(self, message_ids):
        return self.replies


def test_the_grid_packs_what_it_sends_and_turns_a_reply_that_does_not_unpack_into_that_sites_error():
    sent = Message(content(), dst_node_id=5, message_type="train")
    good = Message(pack_content(content()), reply_to=sent)
    hostile_content = _with_layout(pack_content(content()), "arrays", {"format": 1, "arrays": []})
    hostile = Message(hostile_content, reply_to=Message(content(), dst_node_id=6, message_type="train"))
    grid = PromptGrid.__new__(PromptGrid)
    grid._grid = RecordingGrid([good, hostile])
    grid.push_messages([sent])
    assert list(grid._grid.pushed[0].content["arrays"].keys()) == [PACKED_KEY]
    assert grid._grid.pushed[0].metadata is sent.metadata  # ids the grid sets are the caller's too
    unpacked_good, failed = grid.pull_messages(["id-0"])
    assert list(unpacked_good.content["arrays"].keys()) == ["conv.weight", "conv.bias", "steps", "scalar"]
    assert failed.has_error() and "does not unpack" in failed.error.reason
    assert failed.metadata.src_node_id == hostile.metadata.src_node_id
