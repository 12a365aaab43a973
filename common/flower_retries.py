"""Flower's retries for a message's objects that have not arrived yet, made prompt, not impatient.

Wherever Flower 1.32 pulls a message's objects (a SuperNode from the SuperLink, a ClientApp from
its SuperNode, a ServerApp's deployed grid from the SuperLink) it asks again after 1 s, then 2 s,
4 s... up to 10 s. On a message path that is most of a round. `prompt_object_retries` makes the
pull function a Flower module calls retry after `PULL_BACKOFF_S`, at most `PULL_BACKOFF_CAP_S`
apart.

Flower also gives up on an object after 500 tries, which at its own backoff is over an hour.
At ours 500 tries are 25 s, less than a SuperLink restart or a large model's upload can take,
and a SuperNode that gives up drops the message yet waits for its reply for ever
(`clients.flower_processes` answers such a message). So the number of tries is left unbounded
and Flower's own time limit (`PULL_MAX_TIME`, 2 h) is what ends the wait, as before.

Those modules are private: `tests/test_flower_contract.py` checks each name we wrap.
"""

from __future__ import annotations

import functools
from types import ModuleType

PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.02, 0.05


def prompt_object_retries(module: ModuleType, name: str) -> None:
    """Wrap `module.<name>` (a Flower pull taking ``initial_backoff``, ``backoff_cap`` and
    ``max_tries_per_object``) once."""
    pull = getattr(module, name)
    if not isinstance(pull, functools.partial):
        setattr(module, name, functools.partial(pull, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S,
                                                max_tries_per_object=None))
