"""A message's records sent packed into one ConfigRecord: fewer objects for Flower to move.

Flower 1.32 moves a message as a tree of objects, one per record, per Array and per array
chunk, and every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back) moves each
object with its own request: the SuperLink runs several SQL queries per request (the run's
status, the traffic counters, the node's key, the object itself). A 25-tensor model is 44
objects a message, most of a deployed round's time. `pack_content` moves each ArrayRecord of a
message into one ConfigRecord named `LAYOUT_RECORD`: under ``layout:<record name>`` each
array's key, dtype, shape, stype and length (JSON), under ``bytes:<record name>`` the arrays'
own serialised bytes, end to end. The message's ConfigRecords and MetricRecords go in the same
record: under ``folded`` each one's name, type and keys (JSON), under ``value:<i>:<j>`` the
value of key j of record i, as the ConfigRecord holds it. `unpack_content` restores every
record exactly, Array by Array and value by value (after the records left as they were: code
reads records by name). A model message becomes 3 objects (the message, its RecordDict and the
packed record), where it was 44; a site's reply (model, metrics, privacy record) 3, where it
was 46.

A record whose arrays exceed `MAX_PACKED_BYTES` stays as Flower sends it: Flower splits arrays
into 5 MiB chunks so that no request is large, and for such a model (a ResNet-50 is 94 MB) the
transfer, not the count of objects, is the cost.

The ServerApp's grid (`server.prompt_grid`) packs what it sends and unpacks what it receives,
and the ClientApp's first mod (`packed_arrays_mod`) does the same on the site, so the
strategies, SecAgg+ and the site's round see the ArrayRecords they built. A message without
the packed record is left as it is. A packed record that does not describe its bytes (a
hostile or broken sender: sizes, keys, bytes that are not a plain-data .npy array of the dtype
and shape its entry names) raises `PackingError`, naming what is wrong; nothing in it is
executed (the arrays' bytes are parsed by Flower's ``Array.numpy``, without pickle).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

LAYOUT_RECORD = "mammofl.packed-arrays"  # the ConfigRecord holding every packed ArrayRecord
LAYOUT_PREFIX, BYTES_PREFIX = "layout:", "bytes:"  # + record name: its arrays' layout (JSON), their bytes
FOLDED_KEY, VALUE_PREFIX = "folded", "value:"  # the folded records (JSON); + "<record>:<key>" index: one value
LAYOUT_FORMAT = 1
FOLDED_TYPES = {"config": ConfigRecord, "metric": MetricRecord}
MAX_PACKED_BYTES = 16 * 2**20  # a larger ArrayRecord goes in Flower's own 5 MiB chunks


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
    """`content` with every non-empty ArrayRecord (its layout and its bytes), ConfigRecord and
    MetricRecord moved into one ConfigRecord; as it is when that would not make fewer objects."""
    if LAYOUT_RECORD in content:
        raise PackingError(f"the content already has a record named {LAYOUT_RECORD!r}")
    if len(content) == 1 and not any(isinstance(record, ArrayRecord) and len(record)
                                     for record in content.values()):
        return content  # one record of values: packed, it would still be one object
    records: dict[str, Any] = {}
    packed_records: dict[str, Any] = {}
    folded: list[dict[str, Any]] = []
    for name, record in content.items():
        if isinstance(record, (ConfigRecord, MetricRecord)):
            keys = list(record.keys())
            for index, key in enumerate(keys):
                packed_records[f"{VALUE_PREFIX}{len(folded)}:{index}"] = record[key]
            folded.append({"name": name, "type": "config" if isinstance(record, ConfigRecord) else "metric",
                           "keys": keys})
            continue
        if not isinstance(record, ArrayRecord) or len(record) == 0:
            records[name] = record
            continue
        entries, payloads = array_entries(record)
        if sum(map(len, payloads)) > MAX_PACKED_BYTES:
            records[name] = record
            continue
        for entry, payload in zip(entries, payloads, strict=True):
            entry["bytes"] = len(payload)
        packed_records[LAYOUT_PREFIX + name] = json.dumps({"format": LAYOUT_FORMAT, "arrays": entries})
        packed_records[BYTES_PREFIX + name] = b"".join(payloads)
    if folded:
        packed_records[FOLDED_KEY] = json.dumps({"format": LAYOUT_FORMAT, "records": folded})
    if not packed_records:
        return content
    records[LAYOUT_RECORD] = ConfigRecord(packed_records)
    return RecordDict(records)


def unpack_content(content: RecordDict) -> RecordDict:
    """The content `pack_content` was given; content without a packed record as it is."""
    if LAYOUT_RECORD not in content:
        return content
    packed_records = content[LAYOUT_RECORD]
    if not isinstance(packed_records, ConfigRecord):
        raise PackingError(f"{LAYOUT_RECORD!r} is a {type(packed_records).__name__}; valid: a ConfigRecord")
    records: dict[str, Any] = {name: record for name, record in content.items() if name != LAYOUT_RECORD}
    keys = set(packed_records.keys())
    folded = _folded(packed_records[FOLDED_KEY]) if FOLDED_KEY in keys else []
    names = {key.removeprefix(prefix) for key in keys for prefix in (LAYOUT_PREFIX, BYTES_PREFIX)
             if key.startswith(prefix)}
    expected = ({LAYOUT_PREFIX + name for name in names} | {BYTES_PREFIX + name for name in names}
                | ({FOLDED_KEY} if FOLDED_KEY in keys else set())
                | {f"{VALUE_PREFIX}{index}:{position}" for index, entry in enumerate(folded)
                   for position in range(len(entry["keys"]))})
    if keys != expected:
        raise PackingError(f"{LAYOUT_RECORD!r} lacks {sorted(expected - keys)} and holds {sorted(keys - expected)}; "
                           f"valid: a {LAYOUT_PREFIX!r} (JSON str) and a {BYTES_PREFIX!r} (bytes) key per ArrayRecord, "
                           f"a {VALUE_PREFIX!r} key per value that {FOLDED_KEY!r} names")
    for index, entry in enumerate(folded):
        name = entry["name"]
        if name in records or name in names:
            raise PackingError(f"record {name!r} is in the message and packed too")
        values = {key: packed_records[f"{VALUE_PREFIX}{index}:{position}"] for position, key in enumerate(entry["keys"])}
        try:
            records[name] = FOLDED_TYPES[entry["type"]](values)
        except (TypeError, ValueError) as error:
            raise PackingError(f"record {name!r}: not a {FOLDED_TYPES[entry['type']].__name__} ({error})") from None
    for name in sorted(names):
        if name in records:
            raise PackingError(f"record {name!r} is in the message and packed too")
        data = packed_records[BYTES_PREFIX + name]
        if not isinstance(data, bytes):
            raise PackingError(f"record {name!r}: the packed arrays are a {type(data).__name__}; valid: bytes")
        entries = _entries(name, packed_records[LAYOUT_PREFIX + name])
        sizes = [entry.pop("bytes") for entry in entries]
        if sum(sizes) != len(data):
            raise PackingError(f"record {name!r}: the layout names {sum(sizes)} bytes, the packed record holds "
                               f"{len(data)}")
        view = memoryview(data)
        ends = np.cumsum(sizes, dtype=np.int64).tolist()
        payloads = [bytes(view[end - size:end]) for size, end in zip(sizes, ends, strict=True)]
        for entry, payload in zip(entries, payloads, strict=True):
            _check_npy_header(name, entry, payload)
        records[name] = array_record(entries, payloads)
    return RecordDict(records)


def _check_npy_header(name: str, entry: dict[str, Any], payload: bytes) -> None:
    """A NumPy array's bytes are a .npy array of plain data with the dtype and shape its entry
    names (Flower reads the bytes' own header, not the entry).

    An entry with no dtype and shape ``[]`` declares nothing: Flower's legacy ``Parameters``
    conversion (``flwr.compat``, used by SecAgg+) builds its Arrays so, and its empty-model
    marker has no bytes at all; the bytes of such an entry are still checked to be a .npy array.
    """
    if entry["stype"] != SType.NUMPY:
        return
    declared = not (entry["dtype"] == "" and entry["shape"] == [])
    if not declared and payload == b"":
        return
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy version {version}; valid: 1.0 or 2.0")
        shape, _, dtype = read_header(stream)  # what np.load reads
    except (ValueError, OSError) as error:
        raise PackingError(f"record {name!r}, array {entry['key']!r}: its bytes are not a .npy array ({error})") from None
    if dtype.hasobject:
        raise PackingError(f"record {name!r}, array {entry['key']!r}: its bytes hold Python objects ({dtype}), "
                           "which only pickle reads; valid: numbers")
    if declared and (list(shape) != entry["shape"] or str(dtype) != entry["dtype"]):
        raise PackingError(f"record {name!r}, array {entry['key']!r}: its bytes hold {dtype} {list(shape)}, "
                           f"the layout names {entry['dtype']} {entry['shape']}")


def _folded(layout: Any) -> list[dict[str, Any]]:
    """The folded records' entries: each a name, a type (`FOLDED_TYPES`) and its keys, names and keys unique."""
    records = _layout_list(layout, "records", "the folded records' layout")
    names = set()
    for entry in records:
        if not (isinstance(entry, dict) and set(entry) == {"name", "type", "keys"} and isinstance(entry["name"], str)
                and entry["type"] in FOLDED_TYPES and isinstance(entry["keys"], list)
                and all(isinstance(key, str) for key in entry["keys"]) and len(set(entry["keys"])) == len(entry["keys"])):
            raise PackingError('a folded record\'s entry is not {"name": str, "type": "config" or "metric", '
                               '"keys": [str, ...] (each once)}')
        if entry["name"] in names:
            raise PackingError(f"the folded records name {entry['name']!r} twice")
        names.add(entry["name"])
    return records


def _layout_list(layout: Any, field: str, what: str) -> list[Any]:
    """The list under `field` of a format-`LAYOUT_FORMAT` JSON layout; `what` names it in errors."""
    try:
        parsed = json.loads(layout) if isinstance(layout, str) else None
    except ValueError as error:
        raise PackingError(f"{what} is not JSON ({error})") from None
    if not isinstance(parsed, dict) or parsed.get("format") != LAYOUT_FORMAT or not isinstance(parsed.get(field), list):
        raise PackingError(f"{what} is not a format-{LAYOUT_FORMAT} layout "
                           f'(valid: {{"format": {LAYOUT_FORMAT}, "{field}": [...]}})')
    return parsed[field]


def _entries(name: str, layout: Any) -> list[dict[str, Any]]:
    entries, keys = [], set()
    for entry in _layout_list(layout, "arrays", f"record {name!r}: the layout"):
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


def packed(message: Message, already: dict[int, tuple[RecordDict, RecordDict]] | None = None) -> Message:
    """`message` (a new one with the same metadata) with its content packed; an error message as it is.

    `already` maps ``id(content)`` to (content, its packed content) for the messages of one push:
    a content several messages share (a strategy sends every site the same RecordDict) is packed
    once, so Flower serialises and hashes it once. Each entry holds its content, so no id is
    reused while the map lives."""
    if message.has_error():
        return message
    if already is None:
        return Message(content=pack_content(message.content), metadata=message.metadata)
    if (entry := already.get(id(message.content))) is None:
        entry = already[id(message.content)] = (message.content, pack_content(message.content))
    return Message(content=entry[1], metadata=message.metadata)


def unpacked(message: Message) -> Message:
    """`message` with its content unpacked (`PackingError` when it does not unpack)."""
    if message.has_error() or LAYOUT_RECORD not in message.content:
        return message
    return Message(content=unpack_content(message.content), metadata=message.metadata)


def packed_arrays_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp mod: the app sees the ArrayRecords the aggregator built; its reply goes back packed."""
    return packed(call_next(unpacked(message), context))
