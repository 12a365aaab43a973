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
