"""The SuperLink's state: runs, messages and objects in memory, its enrolments on disk.

Flower 1.32 offers two LinkStates: SQLite (everything on disk) and in-memory (nothing). On a
deployed round the SQLite one is the largest cost left (``docs/deployment.md``, "Limits
today": 40% of the SuperLink's busy time in SQLAlchemy and SQLite); the in-memory one forgets
which public key is which node when the SuperLink restarts, and Flower's SuperNode does not
recover from that (it keeps its old node id; every hospital would restart its site).

`EnrolmentKeepingLinkState` is Flower's `InMemoryLinkState` whose node table (each enrolled
site's public key, node id, owner and status) is written to one JSON file whenever a node is
enrolled or unenrolled and whenever one goes online or offline, and read back when the SuperLink
starts: a restarted SuperLink knows every site by its old node id, counts a site that was
online as online for one heartbeat patience (Flower's 2 x 30 s), and the sites reconnect by
themselves, as with the SQLite state. What a restart loses is what the in-memory state holds
alone: the runs (``flwr ls``, ``flwr log``) and their messages and objects; a run that was
going is resumed as a new run (``mammofl federation run --resume``). A heartbeat that
changes nothing is not written.

``python -m server.superlink_state --enrolments FILE ARGS`` runs Flower's own
``flower-superlink`` (ARGS) with this state. It reaches into Flower's private state classes,
so the Flower version is pinned and ``tests/test_flower_contract.py`` fails loudly when they
change what this module relies on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from flwr.common.constant import HEARTBEAT_PATIENCE
from flwr.proto.node_pb2 import NodeInfo
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NodeStatus
from flwr.supercore.date import now
from flwr.supercore.object_store import ObjectStoreFactory
from google.protobuf import json_format

ENROLMENTS_FORMAT = 1


class EnrolmentsFileError(ValueError):
    """The enrolments file exists but cannot be read as one."""


def read_enrolments(path: Path) -> list[NodeInfo]:
    """The nodes stored in `path` (none when it does not exist)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EnrolmentsFileError(f"{path} is not a readable enrolments file ({error}); restore it from a "
                                  "backup, or move it away and enrol every site again") from None
    if not isinstance(raw, dict) or raw.get("format") != ENROLMENTS_FORMAT or not isinstance(raw.get("nodes"), list):
        raise EnrolmentsFileError(f"{path} is not an enrolments file of format {ENROLMENTS_FORMAT} "
                                  '(expected {"format": 1, "nodes": [...]})')
    try:
        return [json_format.ParseDict(node, NodeInfo()) for node in raw["nodes"]]
    except json_format.ParseError as error:
        raise EnrolmentsFileError(f"{path} holds a node that is not a Flower NodeInfo ({error})") from None


def write_enrolments(path: Path, nodes: list[NodeInfo]) -> None:
    """Replace `path` with `nodes`, whole or not at all (a crash leaves the previous file)."""
    document = {"format": ENROLMENTS_FORMAT,
                "nodes": [json_format.MessageToDict(node, preserving_proto_field_name=True) for node in nodes]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(document, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def nodes_of_sqlite_state(database: Path) -> list[NodeInfo]:
    """The node table of a SuperLink's SQLite state (what a deployment kept before this module)."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.federation import NoOpFederationManager

    state = SqlLinkState(str(database), NoOpFederationManager(), ObjectStoreFactory().store())
    state.initialize()
    return list(state.get_node_info())


class EnrolmentKeepingLinkState(InMemoryLinkState):
    """Flower's in-memory LinkState whose node table lives on in `path` (see the module)."""

    def __init__(self, path: Path, federation_manager: Any, object_store: Any, *,
                 import_from: Path | None = None) -> None:
        super().__init__(federation_manager, object_store)
        self._path = path
        nodes = read_enrolments(path)
        nodes_imported = not path.exists() and import_from is not None and import_from.is_file()
        if nodes_imported:
            nodes = nodes_of_sqlite_state(import_from)
            print(f"mammofl: {len(nodes)} enrolment(s) imported from {import_from} into {path}",
                  file=sys.stderr, flush=True)
        restarted = now().timestamp()
        for node in nodes:
            if node.status == NodeStatus.ONLINE:
                # Online when the SuperLink stopped: online for as long as after a heartbeat received
                # now, as Flower's SQLite state would have it; a site that died meanwhile goes offline
                # when that runs out, as one that dies while the SuperLink runs.
                node.online_until = max(node.online_until, restarted + HEARTBEAT_PATIENCE * node.heartbeat_interval)
            self.nodes[node.node_id] = node
            self.node_public_key_to_node_id[node.public_key] = node.node_id
            self.owner_to_node_ids.setdefault(node.owner_aid, set()).add(node.node_id)
        self._save()
        if nodes_imported:
            # Read once: a later loss of the enrolments file must not bring back what it unenrolled.
            import_from.rename(import_from.with_name(import_from.name + ".imported"))

    def _save(self) -> None:
        with self.lock:
            write_enrolments(self._path, list(self.nodes.values()))

    def create_node(self, owner_aid: str, owner_name: str, public_key: bytes, heartbeat_interval: float) -> int:
        with self.lock:
            node_id = super().create_node(owner_aid, owner_name, public_key, heartbeat_interval)
            if node_id:
                try:
                    self._save()
                except OSError:  # an enrolment the file does not hold would be lost at a restart: refuse it
                    del self.nodes[node_id], self.node_public_key_to_node_id[public_key]
                    self.owner_to_node_ids[owner_aid].discard(node_id)
                    raise
            return node_id

    def delete_node(self, owner_aid: str, node_id: int) -> None:
        with self.lock:
            before = NodeInfo()
            if node_id in self.nodes:
                before.CopyFrom(self.nodes[node_id])
            super().delete_node(owner_aid, node_id)
            try:
                self._save()
            except OSError:  # the file still enrols it: so does this state, until the unenrolment is saved
                self.nodes[node_id].CopyFrom(before)
                raise

    def activate_node(self, node_id: int, heartbeat_interval: float) -> bool:
        with self.lock:
            changed = super().activate_node(node_id, heartbeat_interval)
            if changed:
                self._save_when_possible()
            return changed

    def deactivate_node(self, node_id: int) -> bool:
        with self.lock:
            changed = super().deactivate_node(node_id)
            if changed:
                self._save_when_possible()
            return changed

    def acknowledge_node_heartbeat(self, node_id: int, heartbeat_interval: float) -> bool:
        with self.lock:
            before = self._statuses()
            acknowledged = super().acknowledge_node_heartbeat(node_id, heartbeat_interval)
            if self._statuses() != before:  # an offline site back online: not at every heartbeat
                self._save_when_possible()
            return acknowledged

    def _check_and_tag_offline_nodes(self, node_ids: list[int] | None = None) -> None:
        with self.lock:
            before = self._statuses()
            super()._check_and_tag_offline_nodes(node_ids)
            if self._statuses() != before:  # a site whose heartbeats stopped
                self._save_when_possible()

    def _statuses(self) -> list[str]:
        return [node.status for node in self.nodes.values()]

    def _save_when_possible(self) -> None:
        # When a site last connected or left is worth keeping, not worth refusing a site over.
        try:
            self._save()
        except OSError as error:
            print(f"mammofl: could not update {self._path} ({error.strerror}); the enrolments in it stand",
                  file=sys.stderr, flush=True)


class EnrolmentKeepingLinkStateFactory(LinkStateFactory):
    """Flower's LinkStateFactory, handing out one `EnrolmentKeepingLinkState`."""

    def __init__(self, path: Path, federation_manager: Any, objectstore_factory: ObjectStoreFactory, *,
                 import_from: Path | None = None) -> None:
        super().__init__(FLWR_IN_MEMORY_DB_NAME, federation_manager, objectstore_factory)
        self._path = path
        self._import_from = import_from

    def state(self) -> EnrolmentKeepingLinkState:
        with self._state_lock:
            if self.state_instance is None:
                self.state_instance = EnrolmentKeepingLinkState(
                    self._path, self.federation_manager, self.objectstore_factory.store(),
                    import_from=self._import_from)
            return self.state_instance  # type: ignore[return-value]


def superlink(arguments: list[str]) -> None:
    """Run ``flower-superlink ARGS`` with the enrolments of ``--enrolments FILE`` (see the module)."""
    from flwr.server import app

    if len(arguments) < 2 or arguments[0] != "--enrolments":
        sys.exit("usage: python -m server.superlink_state --enrolments FILE [--import-from SQLITE] "
                 "FLOWER-SUPERLINK-ARGS...")
    path, arguments = Path(arguments[1]), arguments[2:]
    import_from = None
    if arguments[:1] == ["--import-from"]:
        import_from, arguments = Path(arguments[1]), arguments[2:]
    if "--database" in arguments:
        sys.exit("python -m server.superlink_state: the state is its own; do not pass --database")
    try:
        read_enrolments(path)  # a broken file stops the SuperLink here, with its name, not mid-start
    except EnrolmentsFileError as error:
        sys.exit(f"mammofl: {error}")

    def factories(database: str, federation_manager: Any) -> tuple[ObjectStoreFactory, LinkStateFactory]:
        objectstore_factory = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objectstore_factory, EnrolmentKeepingLinkStateFactory(path, federation_manager, objectstore_factory,
                                                                     import_from=import_from)

    app._get_objectstore_linkstate_factories = factories
    print(f"mammofl: SuperLink {os.getpid()} keeping runs in memory, enrolments in {path}", file=sys.stderr,
          flush=True)
    sys.argv = ["flower-superlink", *arguments]
    app.run_superlink()


if __name__ == "__main__":
    superlink(sys.argv[1:])
