"""What our deployment relies on inside Flower: fails loudly when an upgrade changes it.

`clients.flower_processes` caps the waits of two private Flower modules, `server.prompt_grid`
polls with the Grid's public push/pull, and `clients.thin_app` subclasses ClientApp. A Flower
release that moves or renames what they touch must fail here, not slow or break a deployment.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest


def test_the_flower_version_is_the_one_these_contracts_were_checked_against():
    assert version("flwr").startswith("1.32."), "re-check clients/flower_processes.py against this Flower"


@pytest.mark.parametrize(("module_name", "waits"), [
    ("flwr.supernode.start_client_internal", ["time.sleep(3)", "time.sleep(0.5)"]),
    ("flwr.supercore.superexec.run_superexec", ["time.sleep(1)"]),
])
def test_the_waits_we_shorten_are_module_level_time_sleeps(module_name, waits):
    import importlib

    module = importlib.import_module(module_name)
    source = inspect.getsource(module)

    assert getattr(module, "time", None) is not None and module.time.__name__ == "time"
    for wait in waits:
        assert wait in source, f"{module_name} no longer waits with {wait}"


@pytest.mark.parametrize(("module_name", "loop", "calls", "work"), [
    # The SuperNode: a pull returns the message's run id (None when there was none), then it pushes.
    ("flwr.supernode.start_client_internal", "start_client_internal",
     ["run_id = _pull_and_store_message(", "_push_messages("], "if run_id is None:"),
    # The SuperExec: a claimed task is launched, then its result handled.
    ("flwr.supercore.superexec.run_superexec", "run_superexec", ["_handle_launch_result(launch_result, task)"], None),
])
def test_the_loops_call_the_module_functions_we_mark_as_work_by_name(module_name, loop, calls, work):
    # `clients.flower_processes` wraps these to know when a loop last had work (its adaptive polls).
    import importlib

    module = importlib.import_module(module_name)
    source = inspect.getsource(getattr(module, loop))
    for call in calls:
        assert call in source, f"{module_name}.{loop} no longer calls {call}"
        assert inspect.isfunction(getattr(module, call.split("(")[0].split("= ")[-1]))
    assert work is None or work in source


def test_the_supernode_pulls_a_messages_objects_through_a_module_level_pull_objects():
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)

    assert "obj_contents = pull_objects(" in source
    assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(
        inspect.signature(start_client_internal.pull_objects).parameters)


def test_the_supernode_starts_its_superexec_by_name_through_subprocess_popen():
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)

    assert 'command = ["flower-superexec"]' in source and "subprocess.Popen(command)" in source


def test_the_entry_points_we_start_exist():
    from flwr.supercore.cli import flower_superexec
    from flwr.supernode.cli import flower_supernode

    assert callable(flower_supernode) and callable(flower_superexec)


def test_the_grid_and_client_app_apis_we_build_on_are_public():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

    assert {"push_messages", "pull_messages", "send_and_receive", "get_node_ids", "create_message"} <= set(dir(Grid))
    assert callable(ClientApp.__call__)


def test_the_superexec_picks_its_clientapp_plugin_through_a_module_function_we_can_wrap():
    # `clients.flower_processes superexec` swaps in `clients.task_handoff.HandoffClientAppPlugin`.
    import importlib

    from flwr.supercore.superexec.plugin import ClientAppExecPlugin
    from flwr.supercore.superexec.run_superexec import run_superexec

    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
    assert cli._get_plugin_and_stub_class("clientapp")[0] is ClientAppExecPlugin
    assert "_get_plugin_and_stub_class(args.plugin_type)" in inspect.getsource(cli.flower_superexec)
    assert "plugin.launch_task(token=claim_res.token, task=task)" in inspect.getsource(run_superexec)
    assert list(inspect.signature(ClientAppExecPlugin.launch_task).parameters) == ["self", "token", "task"]
    assert {"appio_api_address", "insecure", "root_certificates_path", "get_run"} <= set(
        inspect.signature(ClientAppExecPlugin.__init__).parameters)


def test_what_a_handed_over_task_runs_is_what_flwr_clientapp_runs():
    # `clients.task_handoff.run_task` repeats run_clientapp's steps with its helpers.
    from flwr.supernode.runtime import run_clientapp as module

    source = inspect.getsource(module.run_clientapp)
    for step in ("pull_task_input(stub)", "client_app(message=message, context=context)",
                 "push_message(stub, reply_message, context)", "HeartbeatSender(make_task_heartbeat_fn_grpc(stub))",
                 "AppIoTokenClientInterceptor(token)", "push_task_output("):
        assert step in source, f"flwr-clientapp no longer does {step}"
    assert list(inspect.signature(module.push_task_output).parameters) == ["stub", "context", "sub_status", "details"]
    # ... and pulls the message through this module-level name, which `_prompt_pulls` wraps.
    assert "message = pull_and_inflate_object_from_tree(" in inspect.getsource(module.pull_task_input)
    assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(
        inspect.signature(module.pull_and_inflate_object_from_tree).parameters)
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.superexec.executor import LaunchResult

    assert {"task_id", "run_id"} <= {field.name for field in Task.DESCRIPTOR.fields} and LaunchResult.accepted()


def test_the_deployed_grid_pulls_reply_objects_through_a_module_level_pull_objects():
    # `server.prompt_grid` wraps it with shorter retries.
    from flwr.superlink.grid import grpc_grid

    assert "all_object_contents = pull_objects(" in inspect.getsource(grpc_grid.GrpcGrid)
    assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(
        inspect.signature(grpc_grid.pull_objects).parameters)


def test_the_supernode_deletes_a_received_message_only_when_it_drops_it():
    # `clients.flower_processes._answering_dropped_messages` takes a delete_messages call inside
    # `_pull_and_store_message` as "dropped", and answers with Flower's own `_insert_message`.
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal._pull_and_store_message)
    assert source.count("state.delete_messages(") == 1
    assert source.index("state.delete_messages(") > source.index('"Failed to receive message %s: %s"')
    assert list(inspect.signature(start_client_internal._insert_message).parameters) == ["msg", "state", "store"]


def test_the_superlink_builds_its_state_through_a_module_function_we_can_replace():
    # `server.superlink_state` replaces it to give the SuperLink its enrolment-keeping state.
    from flwr.server import app
    from flwr.server.superlink.linkstate import LinkStateFactory

    assert "= _get_objectstore_linkstate_factories(\n            args.database, federation_manager" in \
        inspect.getsource(app.run_superlink)
    assert list(inspect.signature(app._get_objectstore_linkstate_factories).parameters) == [
        "database", "federation_manager"]
    factory = inspect.getsource(LinkStateFactory)
    for attribute in ("self.state_instance", "self._state_lock", "self.federation_manager", "self.objectstore_factory"):
        assert attribute in factory, f"LinkStateFactory no longer has {attribute}"


def test_in_the_in_memory_state_only_the_methods_we_persist_change_who_is_enrolled():
    # `server.superlink_state.EnrolmentKeepingLinkState` writes the node table after these
    # methods, and restores it into these three dictionaries. Another method that adds a node,
    # changes its key or unenrols it would be an enrolment the file does not keep.
    import re

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    init = inspect.getsource(InMemoryLinkState.__init__)
    for table in ("self.nodes: dict[int, NodeInfo] = {}", "self.node_public_key_to_node_id: dict[bytes, int] = {}",
                  "self.owner_to_node_ids: dict[str, set[int]] = {}", "self.lock = threading.RLock()"):
        assert table in init, f"InMemoryLinkState no longer sets {table}"
    writes = re.compile(r"self\.(nodes|node_public_key_to_node_id|owner_to_node_ids)(\[[^]]*\] =|\.setdefault|\.pop|"
                        r"\.update|\.clear|\.popitem)|\.status = NodeStatus\.UNREGISTERED|\.public_key =")
    writers = {name for name, method in inspect.getmembers(InMemoryLinkState, inspect.isfunction)
               if writes.search(inspect.getsource(method))}
    assert set(writers) == {"create_node", "delete_node"}, sorted(writers)
    for name in ("create_node", "delete_node", "activate_node", "deactivate_node"):
        assert getattr(InMemoryLinkState, name).__qualname__ == f"InMemoryLinkState.{name}"
    assert list(inspect.signature(InMemoryLinkState.create_node).parameters) == [
        "self", "owner_aid", "owner_name", "public_key", "heartbeat_interval"]
    assert list(inspect.signature(InMemoryLinkState.delete_node).parameters) == ["self", "owner_aid", "node_id"]
