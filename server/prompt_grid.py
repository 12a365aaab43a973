"""A Grid that collects replies as soon as they arrive.

Flower 1.32's deployed grid (`GrpcGrid.send_and_receive`) sleeps 3 s between pulls of replies,
so every message round trip of a deployed federation costs up to 3 s of waiting: on a SecAgg+
round (four messages) that alone is 12 s. `PromptGrid` wraps the grid a ServerApp is given and
implements ``send_and_receive`` with the Grid's own public ``push_messages``/``pull_messages``,
polling after `FIRST_POLL_S` and backing off to `MAX_POLL_S` while nothing comes, and has the
deployed grid retry a reply's objects promptly (`common.flower_retries`). Everything else is
the wrapped grid's. The simulation's in-memory grid is wrapped the same way (it polls
every 0.1 s itself; the wrapper changes nothing it can measure).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import grpc_grid

from common.flower_retries import prompt_object_retries

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.25
BACKOFF = 1.5


class PromptGrid(Grid):
    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        prompt_object_retries(grpc_grid, "pull_objects")  # a reply's objects the site is still pushing

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Pushes `messages`, then pulls until every reply is in or `timeout` seconds have passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = FIRST_POLL_S
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            pause = FIRST_POLL_S if arrived else min(MAX_POLL_S, pause * BACKOFF)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
