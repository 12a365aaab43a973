"""Flower's SuperNode and SuperExec, started with their idle waits shortened.

Flower 1.32 hard-codes the waits on a deployed site's message path: the SuperNode sleeps 3 s
after a pull that found no message and 0.5 s while it waits for a reply to push, retries a
message's objects the SuperLink does not hold yet after 1 s, 2 s, 4 s..., and the SuperExec it
starts polls for tasks every 1 s. On a loopback federation that is most of a round.
``python -m clients.flower_processes supernode ARGS`` runs Flower's own ``flower-supernode``
with those modules' ``time.sleep`` replaced (`_PollingTime`) and object retries made prompt
(`common.flower_retries`); the SuperExec it starts hands tasks to the site's worker
(`clients.task_handoff`). The SuperNode's wait before it asks the SuperLink again for a message
(Flower's 3 s) lasts 0.05 s within 10 s of its last work, 1 s after that (`common.polling`):
prompt between the messages of a round, about one request a second from an idle site. The
SuperExec does not poll faster than Flower's 1 s: its SuperNode rings it (`_Doorbell`) as soon as
a message and its task are stored. A wait on the process's own in-memory state (the
SuperNode waiting for its reply) lasts at most `LOCAL_WAIT_S`. A message the SuperNode received
but could not pull the objects of is answered with an error reply, so the SuperNode does not wait
for its reply for ever (`_answering_dropped_messages`). It reaches into two private
Flower modules, so the Flower version is pinned and `tests/test_flower_contract.py` fails
loudly when either module changes the waits or the functions it relies on.

It also puts its own pid in ``MAMMOFL_SITE_PID``, which the SuperExec and every ClientApp
process inherit: the thin ClientApp ties the site worker's life to it (`clients.thin_app`).
"""

from __future__ import annotations

import functools
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from common.flower_retries import prompt_object_retries
from common.polling import ACTIVE_POLL_S, IDLE_POLL_S, poll_pause

LOCAL_WAIT_S = 0.01  # any other wait (on the process's own in-memory state)
SITE_PID_ENV = "MAMMOFL_SITE_PID"  # the SuperNode's pid: the site worker lives as long as it
SITE_THREADS_ENV = "MAMMOFL_SITE_THREADS"  # PyTorch threads of the site worker (unset: all cores)
SITE_STATE_ENV = "MAMMOFL_SITE_STATE_DIR"  # the site's state folder: where its workers' info files are
DOORBELL_ENV = "MAMMOFL_TASK_DOORBELL_FD"  # the SuperExec's end of its SuperNode's doorbell (`_Doorbell`)


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower process we start: this one's binaries first, its own Flower home.

    Flower starts ``flower-superexec`` and the App processes by name, and installs each run's
    app bundle under ``FLWR_HOME``; a deployment keeps that in its own folder, not in ``~/.flwr``.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    # Nothing leaves the machine, and no process waits up to 4 s at exit to try sending it.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


class _Doorbell:
    """A pipe from a SuperNode to the SuperExec it starts, rung when a message is stored for a task.

    Flower's SuperExec finds its tasks by polling the SuperNode (every 1 s); a SuperExec that
    has been idle for a while (a round longer than `common.polling.ACTIVE_WINDOW_S`, the first
    message of a run) took up to that long to start the next one. Rung, it asks at once, so its
    own polls can stay Flower's 1 s. The SuperNode never waits on it: a ring that finds the pipe
    full (the SuperExec is already due to ask) or closed (the SuperExec is gone) is dropped.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # not inherited, but by the SuperExec (`pass_fds`)
        os.set_blocking(self.write_fd, False)

    def ring(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except OSError:  # full (BlockingIOError) or no reader (BrokenPipeError): nothing to wake
            pass


class _PollingTime:
    """`time` as a patched Flower module sees it, with its sleeps shortened.

    A sleep of `poll_s` seconds (the module's wait before it asks again for work) lasts
    `common.polling.poll_pause` of the time since `worked` was last called; any other sleep at
    most `LOCAL_WAIT_S`. Never longer than Flower's own. Given a `doorbell` (the read end of a
    `_Doorbell`), a wait for work lasts Flower's own `poll_s` unless the doorbell rings first.
    """

    def __init__(self, poll_s: float, *, doorbell: int | None = None) -> None:
        self._poll_s = poll_s
        self._last_work = time.monotonic()
        self._doorbell = doorbell

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def worked(self) -> None:
        self._last_work = time.monotonic()

    def pause(self, seconds: float) -> float:
        if seconds != self._poll_s:
            return min(seconds, LOCAL_WAIT_S)
        return min(seconds, poll_pause(time.monotonic() - self._last_work))

    def sleep(self, seconds: float) -> None:
        if seconds == self._poll_s and self._doorbell is not None:
            self._wait_for_the_doorbell(seconds)
        else:
            time.sleep(self.pause(seconds))

    def _wait_for_the_doorbell(self, seconds: float) -> None:
        readable, _, _ = select.select([self._doorbell], [], [], seconds)
        if readable and not os.read(self._doorbell, 4096):  # every ring so far, at once
            self._doorbell = None  # the SuperNode closed its end: back to polling


class _DropWatchingState:
    """A SuperNode's NodeState as `_pull_and_store_message` sees it: every call passes through,
    and a ``delete_messages`` (which that function calls only when it drops what it received)
    is noted."""

    def __init__(self, state: Any) -> None:
        self._state = state
        self.dropped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def delete_messages(self, *args: Any, **kwargs: Any) -> None:
        self.dropped = True
        self._state.delete_messages(*args, **kwargs)


def _answering_dropped_messages(pull_and_store: Callable[..., Any], insert_message: Callable[..., None]) -> Callable[..., Any]:
    """`_pull_and_store_message`, but a message the SuperNode received and then dropped gets an
    error reply.

    Flower 1.32's SuperNode drops a message whose objects it cannot pull (the SuperLink restarted
    and lost them, its run ended meanwhile, they never came) yet still returns its run id, and
    its loop then waits for that message's reply for ever: the site is alive and online and never
    serves again, and every later run waits for it. Answered with an error, as Flower answers a
    FAB it cannot verify (`insert_message` is its own `_insert_message`), the loop pushes that
    reply and goes on; the aggregator sees this site's message as failed, or, for a run that has
    ended, the SuperLink ignores it."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    @functools.wraps(pull_and_store)
    def wrapper(*args: Any, state: Any, object_store: Any, receive: Callable[[], Any], **kwargs: Any) -> Any:
        received: list[Any] = []

        def remembering_receive() -> Any:
            result = receive()
            if result is not None:
                received.append(result[0])
            return result

        watched = _DropWatchingState(state)
        run_id = pull_and_store(*args, state=watched, object_store=object_store, receive=remembering_receive,
                                **kwargs)
        if run_id is not None and received and watched.dropped:
            error = Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                          reason="the site could not receive this message's objects from the SuperLink")
            message_id = received[0].metadata.message_id
            state.record_message_processing_start(message_id)  # the reply's runtime: none spent
            state.record_message_processing_end(message_id)
            insert_message(Message(error, reply_to=received[0]), state, object_store)
            print("mammofl: a message whose objects could not be pulled was answered with an error reply",
                  file=sys.stderr, flush=True)
        return run_id
    return wrapper


def _marking_work(function: Callable[..., Any], clock: _PollingTime, *, when: Callable[[Any], bool],
                  also: Callable[[], None] = lambda: None) -> Callable[..., Any]:
    """`function`, calling ``clock.worked()`` and then `also` after each call whose result `when` accepts."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        if when(result):
            clock.worked()
            also()
        return result
    return wrapper


class _SubprocessLaunchingPromptSuperExec:
    """`subprocess` as the SuperNode sees it: its ``flower-superexec`` starts through this module,
    holding the read end of `doorbell`."""

    def __init__(self, doorbell: _Doorbell) -> None:
        self._doorbell = doorbell

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, command, *args, **kwargs):  # noqa: N802 - the name the SuperNode calls
        if not (command and command[0] == "flower-superexec"):
            return subprocess.Popen(command, *args, **kwargs)
        command = [sys.executable, "-m", "clients.flower_processes", "superexec", *command[1:]]
        env = {**(kwargs.pop("env", None) or os.environ), DOORBELL_ENV: str(self._doorbell.read_fd)}
        pass_fds = (*kwargs.pop("pass_fds", ()), self._doorbell.read_fd)
        process = subprocess.Popen(command, *args, env=env, pass_fds=pass_fds, **kwargs)
        os.close(self._doorbell.read_fd)  # the SuperExec's now: once it is gone, a ring finds no reader
        return process


def supernode(arguments: list[str]) -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    os.environ[SITE_PID_ENV] = str(os.getpid())
    clock = start_client_internal.time = _PollingTime(poll_s=3)
    doorbell = _Doorbell()
    # Work: a message pulled (it returns the message's run id, None when there was none), a reply pushed.
    # A message pulled is stored with its objects and its task: the SuperExec may launch it now.
    start_client_internal._pull_and_store_message = _marking_work(
        _answering_dropped_messages(start_client_internal._pull_and_store_message,
                                    start_client_internal._insert_message),
        clock, when=lambda run_id: run_id is not None, also=doorbell.ring)
    start_client_internal._push_messages = _marking_work(start_client_internal._push_messages, clock,
                                                         when=lambda _: True)
    # A message's objects the SuperLink does not hold yet (the ServerApp is still pushing them).
    prompt_object_retries(start_client_internal, "pull_objects")
    start_client_internal.subprocess = _SubprocessLaunchingPromptSuperExec(doorbell)
    print(f"mammofl: SuperNode {os.getpid()} polling every {ACTIVE_POLL_S}-{IDLE_POLL_S} s", file=sys.stderr,
          flush=True)
    sys.argv = ["flower-supernode", *arguments]
    flower_supernode()


def superexec(arguments: list[str]) -> None:
    import importlib

    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.plugin import ClientAppExecPlugin

    from clients.task_handoff import HandoffClientAppPlugin

    doorbell = os.environ.pop(DOORBELL_ENV, "")  # not handed on to the flwr-clientapp processes it starts
    clock = run_superexec.time = _PollingTime(poll_s=1, doorbell=int(doorbell) if doorbell.isdigit() else None)
    # Work: a task claimed and launched (handed to the site worker or started as a process).
    run_superexec._handle_launch_result = _marking_work(run_superexec._handle_launch_result, clock,
                                                        when=lambda _: True)
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")  # the module, not its function
    plugin_and_stub = cli._get_plugin_and_stub_class

    def with_handoff(plugin_type: str):
        plugin, stub = plugin_and_stub(plugin_type)
        return (HandoffClientAppPlugin, stub) if plugin is ClientAppExecPlugin else (plugin, stub)

    cli._get_plugin_and_stub_class = with_handoff
    waits = "1 s or until its SuperNode rings" if doorbell.isdigit() else f"{ACTIVE_POLL_S}-{IDLE_POLL_S} s"
    print(f"mammofl: SuperExec {os.getpid()} polling every {waits}, handing tasks to the site worker",
          file=sys.stderr, flush=True)
    sys.argv = ["flower-superexec", *arguments]
    flower_superexec()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("supernode", "superexec"):
        sys.exit("usage: python -m clients.flower_processes supernode|superexec ARGS...")
    {"supernode": supernode, "superexec": superexec}[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
