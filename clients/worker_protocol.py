"""The site worker's wire format: a Flower Message and Context over a local socket, public APIs only.

A frame is an 8-byte big-endian header length, a JSON header, then the raw buffers the header
names by index (array bytes, bytes values), each preceded by its 8-byte length. Nothing in it is
executable (no pickle): the content is what the aggregator sent, and it is parsed as data.
Records are rebuilt with `flwr.app`'s constructors (Array, ArrayRecord, ConfigRecord,
MetricRecord, RecordDict, Metadata, Message, Context), so that what the real ClientApp sees in
the worker is what Flower handed the thin app.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

FORMAT = "mammofl-site-worker/1"
_LENGTH = struct.Struct(">Q")
MAX_HEADER_BYTES = 64 * 1024 * 1024
METADATA_FIELDS = ("run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id",
                   "created_at", "ttl", "message_type", "src_task_id", "dst_task_id")


class ProtocolError(Exception):
    """A frame that does not parse: the other side is not a site worker of this version."""


def send_frame(connection: socket.socket, header: dict[str, Any], buffers: list[bytes]) -> None:
    encoded = json.dumps({"format": FORMAT, **header}).encode("utf-8")
    parts = [_LENGTH.pack(len(encoded)), encoded]
    for buffer in buffers:
        parts += [_LENGTH.pack(len(buffer)), buffer]
    connection.sendall(_LENGTH.pack(len(buffers)) + b"".join(parts))


def receive_frame(connection: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    count = _LENGTH.unpack(_exactly(connection, _LENGTH.size))[0]
    length = _LENGTH.unpack(_exactly(connection, _LENGTH.size))[0]
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"a frame header of {length} bytes is over the limit")
    header = json.loads(_exactly(connection, length))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ProtocolError(f"not a {FORMAT} frame")
    buffers = [_exactly(connection, _LENGTH.unpack(_exactly(connection, _LENGTH.size))[0]) for _ in range(count)]
    return header, buffers


CONNECT_TIMEOUT_S = 5.0


def call_worker(info: dict[str, Any], header: dict[str, Any], buffers: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """One request to the site worker that `info` (its info file) names, with its token, and its answer.

    Only connecting is timed: a round of training takes as long as it takes, and a busy worker
    takes the next request when its current one is done."""
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=CONNECT_TIMEOUT_S) as connection:
        connection.settimeout(None)
        send_frame(connection, {"token": info["token"], **header}, buffers)
        return receive_frame(connection)


def _exactly(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 22))
        if not chunk:
            raise ProtocolError("the connection closed in the middle of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- records ------------------------------------------------------------------------------------


def encode_recorddict(records: RecordDict, buffers: list[bytes]) -> list[dict[str, Any]]:
    """The records as JSON-able entries; array and bytes payloads appended to `buffers`."""
    entries = []
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            items = []
            for key, array in record.items():
                buffers.append(array.data)
                items.append({"key": key, "dtype": array.dtype, "shape": list(array.shape), "stype": array.stype,
                              "buffer": len(buffers) - 1})
            entries.append({"name": name, "kind": "array", "items": items})
        elif isinstance(record, MetricRecord):
            entries.append({"name": name, "kind": "metric", "items": {k: _value(v, buffers) for k, v in record.items()}})
        elif isinstance(record, ConfigRecord):
            entries.append({"name": name, "kind": "config", "items": {k: _value(v, buffers) for k, v in record.items()}})
        else:
            raise ProtocolError(f"record {name!r} is a {type(record).__name__}; valid: ArrayRecord, MetricRecord, "
                                "ConfigRecord")
    return entries


def decode_recorddict(entries: list[dict[str, Any]], buffers: list[bytes]) -> RecordDict:
    records: dict[str, Any] = {}
    for entry in entries:
        kind, name = entry["kind"], entry["name"]
        if kind == "array":
            records[name] = ArrayRecord({item["key"]: Array(dtype=item["dtype"], shape=tuple(item["shape"]),
                                                            stype=item["stype"], data=buffers[item["buffer"]])
                                         for item in entry["items"]})
        elif kind in ("metric", "config"):
            values = {key: _decoded(value, buffers) for key, value in entry["items"].items()}
            records[name] = MetricRecord(values) if kind == "metric" else ConfigRecord(values)
        else:
            raise ProtocolError(f"record {name!r} of unknown kind {kind!r}")
    return RecordDict(records)


def _value(value: Any, buffers: list[bytes]) -> Any:
    if isinstance(value, bytes):
        buffers.append(value)
        return {"bytes": len(buffers) - 1}
    if isinstance(value, list):
        return [_value(item, buffers) for item in value]
    return value


def _decoded(value: Any, buffers: list[bytes]) -> Any:
    if isinstance(value, dict):
        return buffers[value["bytes"]]
    if isinstance(value, list):
        return [_decoded(item, buffers) for item in value]
    return value


# --- messages and contexts ----------------------------------------------------------------------


def encode_call(message: Message, context: Context) -> tuple[dict[str, Any], list[bytes]]:
    """What the thin ClientApp sends: the message (metadata and content) and the context."""
    buffers: list[bytes] = []
    header = {
        "metadata": {name: getattr(message.metadata, name) for name in METADATA_FIELDS},
        "content": encode_recorddict(message.content, buffers),
        "context": {"run_id": context.run_id, "node_id": context.node_id, "node_config": dict(context.node_config),
                    "run_config": dict(context.run_config), "state": encode_recorddict(context.state, buffers)},
    }
    return header, buffers


def decode_call(header: dict[str, Any], buffers: list[bytes]) -> tuple[Message, Context]:
    message = Message(content=decode_recorddict(header["content"], buffers),
                      metadata=Metadata(**header["metadata"]))
    raw = header["context"]
    context = Context(run_id=raw["run_id"], node_id=raw["node_id"], node_config=raw["node_config"],
                      state=decode_recorddict(raw["state"], buffers), run_config=raw["run_config"])
    return message, context


def encode_reply(reply: Message, context: Context) -> tuple[dict[str, Any], list[bytes]]:
    """What the worker answers: the reply's content and the context's state after the call."""
    buffers: list[bytes] = []
    return ({"content": encode_recorddict(reply.content, buffers),
             "state": encode_recorddict(context.state, buffers)}, buffers)


def encode_failure(error: BaseException) -> tuple[dict[str, Any], list[bytes]]:
    return {"error": {"type": type(error).__name__, "message": str(error)}}, []
