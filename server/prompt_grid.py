"""A Grid that collects replies as soon as they arrive.

Flower 1.32's deployed grid (`GrpcGrid.send_and_receive`) sleeps 3 s between pulls of replies,
so every message round trip of a deployed federation costs up to 3 s of waiting: on a SecAgg+
round (four messages) that alone is 12 s. `PromptGrid` wraps the grid a ServerApp is given and
implements ``send_and_receive`` with the Grid's own public ``push_messages``/``pull_messages``,
polling as `common.polling` says (every 0.05 s within 10 s of the push or the last reply, every
1 s after that: a reply of a long round waits at most a second longer), and has the deployed
grid retry a reply's objects promptly (`common.flower_retries`). It also sends every
message's records packed into one ConfigRecord and unpacks the replies
(`common.packed_arrays`: the 44 objects of a model message become 3); a reply that does not
unpack is handed on as an error reply of that site, never as a crash of the round. Everything
else is the wrapped grid's. The simulation's in-memory grid is wrapped the same way (it polls
every 0.1 s itself; the wrapper changes nothing it can measure).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.superlink.grid import grpc_grid

from common.flower_retries import prompt_object_retries
from common.packed_arrays import PackingError, packed, unpacked
from common.polling import poll_pause


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
        # The packed copies share the messages' metadata: the ids the grid sets are the caller's too.
        # The model every site is sent is packed, serialised and hashed once, not once per site.
        already: dict[int, tuple] = {}
        return self._grid.push_messages([packed(message, already) for message in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_unpacked_or_error(reply) for reply in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Pushes `messages`, then pulls until every reply is in or `timeout` seconds have passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        last_work = time.monotonic()
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            if arrived:
                last_work = time.monotonic()
            pause = poll_pause(time.monotonic() - last_work)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _unpacked_or_error(reply: Message) -> Message:
    try:
        return unpacked(reply)
    except PackingError as error:
        return Message(error=Error(code=ErrorCode.UNKNOWN, reason=f"the site's reply does not unpack: {error}"),
                       metadata=reply.metadata)
