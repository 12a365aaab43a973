"""Packed records (`common.packed_arrays`): exact round trips, fewer objects, hostile layouts refused.

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
    BYTES_PREFIX,
    FOLDED_KEY,
    LAYOUT_PREFIX,
    LAYOUT_RECORD,
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
    assert list(packed.keys()) == ["empty", LAYOUT_RECORD]  # an empty ArrayRecord is no object to spare
    assert sorted(packed[LAYOUT_RECORD].keys()) == ["bytes:arrays", "bytes:masked", FOLDED_KEY, "layout:arrays",
                                                    "layout:masked", "value:0:0", "value:0:1", "value:1:0"]
    assert set(json.loads(packed[LAYOUT_RECORD]["layout:arrays"])) == {"format", "arrays"}
    restored = unpack_content(packed)
    assert sorted(restored.keys()) == sorted(original.keys())  # the unpacked records come last
    for name in ("arrays", "masked", "empty", "config", "metrics"):
        assert type(restored[name]) is type(original[name]) and list(restored[name].keys()) == list(original[name].keys())
        assert restored[name].object_id == original[name].object_id  # same dtypes, shapes, stypes, bytes, values


@pytest.mark.parametrize("tensors", [[np.ones((3, 2), np.float32), np.array(1.5)], []], ids=["model", "empty"])
def test_a_legacy_parameters_record_packs_as_flower_built_it(tensors):
    # SecAgg+ sends its model through flwr.compat: Arrays with no dtype or shape (the empty model: no bytes).
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

    original = RecordDict({"fitins.parameters": parameters_to_arrayrecord(ndarrays_to_parameters(tensors),
                                                                          keep_input=True)})
    restored = unpack_content(pack_content(original))
    assert restored["fitins.parameters"].object_id == original["fitins.parameters"].object_id


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
    assert packed_objects == 3 and objects >= 10 * packed_objects, (objects, packed_objects)

    # A site's reply: its model, its metrics and its privacy record.
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord({"train_loss": 0.7, "num-examples": 19}),
                        "privacy": ConfigRecord({"site-id": "site-01", "epsilon": 1.25, "status": "trained"})})
    assert len(get_all_nested_objects(Message(pack_content(reply), dst_node_id=1, message_type="train"))) == 3


def test_every_value_of_a_folded_record_comes_back_as_the_same_type():
    original = RecordDict({
        "config": ConfigRecord({"i": 3, "f": 3.0, "s": "3", "b": b"\x00\xff", "t": True, "ints": [1, 2], "floats": [0.5],
                                "strs": ["a"], "bytes": [b"x"], "bools": [False], "empty": []}),
        "metrics": MetricRecord({"i": 3, "f": 3.0, "ints": [1], "floats": [1.5]}),
        "nothing": ConfigRecord(),
        "key:with:colons": MetricRecord({"value:0:0": 1.0}),
    })
    restored = unpack_content(pack_content(original))
    for name, record in original.items():
        assert type(restored[name]) is type(record) and restored[name].object_id == record.object_id, name
        assert {key: type(value) for key, value in restored[name].items()} == {key: type(value) for key, value in record.items()}


def test_a_content_of_one_record_of_values_is_left_as_it_is():
    # Packed, it would still be one object: an evaluation reply, a SecAgg+ stage message.
    original = RecordDict({"metrics": MetricRecord({"val_loss": 0.3})})
    assert pack_content(original) is original


def test_a_record_too_large_to_pack_goes_in_flowers_own_chunks(monkeypatch):
    import common.packed_arrays as packing

    monkeypatch.setattr(packing, "MAX_PACKED_BYTES", 300)
    original = content()
    packed = pack_content(original)
    assert packed["arrays"] is original["arrays"]  # four .npy arrays: more than 300 bytes; "masked" one, fewer
    assert sorted(key for key in packed[LAYOUT_RECORD].keys() if ":masked" in key or ":arrays" in key) == [
        "bytes:masked", "layout:masked"]
    assert unpack_content(packed)["masked"].object_id == original["masked"].object_id


def test_content_without_a_layout_passes_as_it_is():
    original = content()
    assert unpack_content(original) is original
    assert pack_content(RecordDict({"config": ConfigRecord({"a": 1})}))[("config")]["a"] == 1


def test_a_content_that_already_uses_the_layout_name_is_refused():
    with pytest.raises(PackingError, match="already has a record named"):
        pack_content(RecordDict({LAYOUT_RECORD: ConfigRecord({"a": 1})}))


def _replaced(packed: RecordDict, **values) -> RecordDict:
    """`packed` with keys of its packed record set (a value of None removes the key)."""
    records = dict(packed.items())
    entries = dict(records[LAYOUT_RECORD].items())
    for key, value in values.items():
        key = key.replace("__", ":")
        if value is None:
            entries.pop(key)
        else:
            entries[key] = value if isinstance(value, (str, bytes, int)) else json.dumps(value)
    records[LAYOUT_RECORD] = ConfigRecord(entries)
    return RecordDict(records)


def _layout(packed: RecordDict, name: str = "arrays") -> dict:
    return json.loads(packed[LAYOUT_RECORD][LAYOUT_PREFIX + name])


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda layout: {**layout, "arrays": layout["arrays"][:-1]}, "the layout names .* bytes, the packed record holds"),
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
        unpack_content(_replaced(packed, layout__arrays=tamper(_layout(packed))))


@pytest.mark.parametrize(("values", "message"), [
    ({"bytes__arrays": None}, r"lacks \['bytes:arrays'\] and holds \[\]"),
    ({"layout__arrays": None}, r"lacks \['layout:arrays'\]"),
    ({"code": "x"}, r"lacks \[\] and holds \['code'\]"),
    ({"bytes__arrays": "not bytes"}, "the packed arrays are a str; valid: bytes"),
    ({"bytes__arrays": 3}, "the packed arrays are a int; valid: bytes"),
    ({"layout__arrays": 3}, "not a format-1 layout"),
    ({"layout__config": {"format": 1, "arrays": []}, "bytes__config": b""}, "'config' is in the message and packed too"),
    # The folded ConfigRecords and MetricRecords: their layout, their values.
    ({"value__0__0": None}, r"lacks \['value:0:0'\]"),
    ({"value__0__2": 1.0}, r"holds \['value:0:2'\]"),
    ({"value__2__0": 1.0}, r"holds \['value:2:0'\]"),
    ({"folded": None}, r"holds \['value:0:0', 'value:0:1', 'value:1:0'\]"),
    ({"folded": "{not json"}, "the folded records' layout is not JSON"),
    ({"folded": 3}, "not a format-1 layout"),
    ({"folded": {"format": 2, "records": []}}, "not a format-1 layout"),
    ({"folded": {"format": 1, "records": [{"name": "config", "type": "pickle", "keys": ["lr", "names"]},
                                          {"name": "metrics", "type": "metric", "keys": ["loss"]}]}},
     "entry is not .*\"type\": \"config\" or \"metric\""),
    ({"folded": {"format": 1, "records": [{"name": "config", "type": "config", "keys": ["lr", "lr"]},
                                          {"name": "metrics", "type": "metric", "keys": ["loss"]}]}}, r"\(each once\)"),
    ({"folded": {"format": 1, "records": [{"name": "config", "type": "config", "keys": ["lr", "names"]},
                                          {"name": "config", "type": "metric", "keys": ["loss"]}]}}, "name 'config' twice"),
    ({"folded": {"format": 1, "records": [{"name": "arrays", "type": "config", "keys": ["lr", "names"]},
                                          {"name": "metrics", "type": "metric", "keys": ["loss"]}]}},
     "'arrays' is in the message and packed too"),
    ({"folded": {"format": 1, "records": [{"name": "empty", "type": "config", "keys": ["lr", "names"]},
                                          {"name": "metrics", "type": "metric", "keys": ["loss"]}]}},
     "'empty' is in the message and packed too"),
    ({"value__1__0": "not a number"}, r"record 'metrics': not a MetricRecord"),
    ({"value__1__0": True}, r"record 'metrics': not a MetricRecord"),
])
def test_a_packed_record_that_is_not_a_layout_and_its_bytes_per_record_is_refused(values, message):
    with pytest.raises(PackingError, match=message):
        unpack_content(_replaced(pack_content(content()), **values))


def test_a_packed_record_that_is_not_a_config_record_is_refused():
    records = dict(pack_content(content()).items())
    records[LAYOUT_RECORD] = MetricRecord({"x": 1.0})
    with pytest.raises(PackingError, match="is a MetricRecord; valid: a ConfigRecord"):
        unpack_content(RecordDict(records))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("shape", [1000], r"its bytes hold float32 \[4, 3, 3, 3\], the layout names float32 \[1000\]"),
    ("dtype", "float64", "its bytes hold float32 .* the layout names float64"),
])
def test_an_array_whose_bytes_are_not_what_its_layout_entry_names_is_refused(field, value, message):
    packed = pack_content(content())
    layout = _layout(packed)
    layout["arrays"][0][field] = value  # Flower would read the bytes' own header and never notice
    with pytest.raises(PackingError, match=message):
        unpack_content(_replaced(packed, layout__arrays=layout))


def test_bytes_that_are_not_a_numpy_array_are_refused():
    packed = pack_content(content())
    layout = _layout(packed)
    size = sum(entry["bytes"] for entry in layout["arrays"])
    with pytest.raises(PackingError, match="'conv.weight': its bytes are not a .npy array"):
        unpack_content(_replaced(packed, bytes__arrays=b"x" * size))


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_an_array_of_python_objects_is_refused(declared):
    import io as _io

    buffer = _io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # what a hostile peer could send
    hostile = Array(dtype="object" if declared else "", shape=(1,) if declared else (), stype="numpy.ndarray",
                    data=buffer.getvalue())
    with pytest.raises(PackingError, match="'0': its bytes hold Python objects"):
        unpack_content(pack_content(RecordDict({"arrays": ArrayRecord({"0": hostile})})))


def test_undeclared_bytes_that_are_not_a_numpy_array_are_refused():
    hostile = Array(dtype="", shape=(), stype="numpy.ndarray", data=b"not an array")
    with pytest.raises(PackingError, match="'0': its bytes are not a .npy array"):
        unpack_content(pack_content(RecordDict({"arrays": ArrayRecord({"0": hostile})})))


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
    assert "arrays" not in reply.content and BYTES_PREFIX + "arrays" in reply.content[LAYOUT_RECORD]
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
    hostile_content = _replaced(pack_content(content()), layout__arrays={"format": 1, "arrays": []})
    hostile = Message(hostile_content, reply_to=Message(content(), dst_node_id=6, message_type="train"))
    grid = PromptGrid.__new__(PromptGrid)
    grid._grid = RecordingGrid([good, hostile])
    grid.push_messages([sent])
    assert "arrays" not in grid._grid.pushed[0].content and LAYOUT_RECORD in grid._grid.pushed[0].content
    assert grid._grid.pushed[0].metadata is sent.metadata  # ids the grid sets are the caller's too
    unpacked_good, failed = grid.pull_messages(["id-0"])
    assert list(unpacked_good.content["arrays"].keys()) == ["conv.weight", "conv.bias", "steps", "scalar"]
    assert failed.has_error() and "does not unpack" in failed.error.reason
    assert failed.metadata.src_node_id == hostile.metadata.src_node_id


def test_the_grid_packs_a_content_its_messages_share_once_and_never_mixes_up_contents():
    shared = content()
    grid = PromptGrid.__new__(PromptGrid)
    grid._grid = RecordingGrid([])
    grid.push_messages([Message(shared, dst_node_id=node, message_type="train") for node in (1, 2, 3)])
    assert len({id(message.content) for message in grid._grid.pushed}) == 1  # one packing, one hash of the model

    def fresh_contents():  # each message its own content, dropped by the caller as soon as it is packed
        for node in range(20):
            yield Message(RecordDict({"config": ConfigRecord({"node": node}), "arrays": ArrayRecord(
                {"w": Array(np.full(3, node, dtype=np.int64))})}), dst_node_id=node + 1, message_type="train")

    grid.push_messages(fresh_contents())
    for node, message in enumerate(grid._grid.pushed):
        restored = unpack_content(message.content)
        assert restored["config"]["node"] == node and restored["arrays"]["w"].numpy().tolist() == [node] * 3


def test_a_content_packed_for_a_push_stays_alive_while_its_map_does_so_its_id_is_not_reused():
    import gc
    import weakref

    from common.packed_arrays import packed

    already: dict = {}
    original = content()
    alive = weakref.ref(original)
    packed(Message(original, dst_node_id=1, message_type="train"), already)
    del original
    gc.collect()
    assert alive() is not None
