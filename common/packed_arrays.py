"""A message's ArrayRecords sent as one Array each: fewer objects for Flower to move.

Flower 1.32 moves a message as a tree of objects, one per record, per Array and per array
chunk, and every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back) moves each
object with its own request: the SuperLink runs several SQL queries per request (the run's
status, the traffic counters, the node's key, the object itself). A 25-tensor model is 42
objects a message, most of a deployed round's time. `pack_content` turns each ArrayRecord of
a message into an ArrayRecord of one byte Array (the arrays' own serialised bytes, end to
end) and records the layout (each array's key, dtype, shape, stype, length) in a ConfigRecord
named `LAYOUT_RECORD`; `unpack_content` restores the ArrayRecords exactly, Array by Array.

The ServerApp's grid (`server.prompt_grid`) packs what it sends and unpacks what it receives,
and the ClientApp's first mod (`packed_arrays_mod`) does the same on the site, so the
strategies, SecAgg+ and the site's round see the ArrayRecords they built. A message without
the layout record is left as it is. A layout that does not fit its bytes (a hostile or broken
sender) raises `PackingError`, naming what is wrong; nothing in it is executed (the arrays'
bytes are parsed by Flower's ``Array.numpy``, without pickle).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

PACKED_KEY = "mammofl.packed"  # the one Array of a packed ArrayRecord
LAYOUT_RECORD = "mammofl.array-layout"  # ConfigRecord: record name -> its arrays' layout (JSON)
LAYOUT_FORMAT = 1


class PackingError(ValueError):
    """A packed message whose layout does not describe its bytes."""


def array_entries(record: ArrayRecord) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Each Array of `record` as a JSON-able entry (key, dtype, shape, stype) and its serialised bytes."""
    entries, payloads = [], []
    for key, array in record.items():
        entries.append({"key": key, "dtype": array.dtype, "shape": list(array.shape), "stype": array.stype})
        payloads.append(array.data)
    return entries, payloads


def array_record(entries: list[dict[str, Any]], payloads: list[bytes]) -> ArrayRecord:
    """The ArrayRecord `array_entries` described, Array by Array."""
    return ArrayRecord({entry["key"]: Array(dtype=entry["dtype"], shape=tuple(entry["shape"]), stype=entry["stype"],
                                            data=payload)
                        for entry, payload in zip(entries, payloads, strict=True)})


def pack_content(content: RecordDict) -> RecordDict:
    """`content` with every non-empty ArrayRecord as one byte Array, and the layout to undo it."""
    if LAYOUT_RECORD in content:
        raise PackingError(f"the content already has a record named {LAYOUT_RECORD!r}")
    records: dict[str, Any] = {}
    layouts: dict[str, str] = {}
    for name, record in content.items():
        if not isinstance(record, ArrayRecord) or len(record) == 0:
            records[name] = record
            continue
        entries, payloads = array_entries(record)
        for entry, payload in zip(entries, payloads, strict=True):
            entry["bytes"] = len(payload)
        layouts[name] = json.dumps({"format": LAYOUT_FORMAT, "arrays": entries})
        records[name] = ArrayRecord({PACKED_KEY: Array(np.frombuffer(b"".join(payloads), dtype=np.uint8))})
    if not layouts:
        return content
    records[LAYOUT_RECORD] = ConfigRecord(layouts)
    return RecordDict(records)


def unpack_content(content: RecordDict) -> RecordDict:
    """The content `pack_content` was given; content without a layout record as it is."""
    if LAYOUT_RECORD not in content:
        return content
    layouts = content[LAYOUT_RECORD]
    if not isinstance(layouts, ConfigRecord):
        raise PackingError(f"{LAYOUT_RECORD!r} is a {type(layouts).__name__}; valid: a ConfigRecord")
    records: dict[str, Any] = {name: record for name, record in content.items() if name != LAYOUT_RECORD}
    for name, layout in layouts.items():
        record = records.get(name)
        if not isinstance(record, ArrayRecord) or list(record.keys()) != [PACKED_KEY]:
            raise PackingError(f"record {name!r} has a layout but is not a packed ArrayRecord "
                               f"(valid: an ArrayRecord holding only {PACKED_KEY!r})")
        entries = _entries(name, layout)
        data = record[PACKED_KEY].numpy()
        if data.dtype != np.uint8 or data.ndim != 1:
            raise PackingError(f"record {name!r}: the packed array is {data.dtype} of shape {data.shape}; "
                               "valid: a 1-D uint8 array")
        sizes = [entry.pop("bytes") for entry in entries]
        if sum(sizes) != data.size:
            raise PackingError(f"record {name!r}: the layout names {sum(sizes)} bytes, the packed array holds "
                               f"{data.size}")
        ends = np.cumsum(sizes).tolist()
        view = memoryview(data)
        payloads = [bytes(view[end - size:end]) for size, end in zip(sizes, ends, strict=True)]
        records[name] = array_record(entries, payloads)
    return RecordDict(records)


def _entries(name: str, layout: Any) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(layout) if isinstance(layout, str) else None
    except ValueError as error:
        raise PackingError(f"record {name!r}: the layout is not JSON ({error})") from None
    if not isinstance(parsed, dict) or parsed.get("format") != LAYOUT_FORMAT or not isinstance(parsed.get("arrays"), list):
        raise PackingError(f"record {name!r}: the layout is not a format-{LAYOUT_FORMAT} layout "
                           '(valid: {"format": 1, "arrays": [...]})')
    entries, keys = [], set()
    for entry in parsed["arrays"]:
        if not (isinstance(entry, dict) and set(entry) == {"key", "dtype", "shape", "stype", "bytes"}
                and isinstance(entry["key"], str) and isinstance(entry["dtype"], str)
                and isinstance(entry["stype"], str) and isinstance(entry["shape"], list)
                and all(type(size) is int and size >= 0 for size in entry["shape"])
                and type(entry["bytes"]) is int and entry["bytes"] >= 0):
            raise PackingError(f"record {name!r}: a layout entry is not "
                               '{"key": str, "dtype": str, "shape": [int >= 0, ...], "stype": str, "bytes": int >= 0}')
        if entry["key"] in keys:
            raise PackingError(f"record {name!r}: the layout names array {entry['key']!r} twice")
        keys.add(entry["key"])
        entries.append(dict(entry))
    return entries


def packed(message: Message) -> Message:
    """`message` (a new one with the same metadata) with its content packed; an error message as it is."""
    if message.has_error():
        return message
    return Message(content=pack_content(message.content), metadata=message.metadata)


def unpacked(message: Message) -> Message:
    """`message` with its content unpacked (`PackingError` when it does not unpack)."""
    if message.has_error() or LAYOUT_RECORD not in message.content:
        return message
    return Message(content=unpack_content(message.content), metadata=message.metadata)


def packed_arrays_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp mod: the app sees the ArrayRecords the aggregator built; its reply goes back packed."""
    return packed(call_next(unpacked(message), context))
