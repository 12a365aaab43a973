"""Two-speed polling (`common.polling`, `clients.flower_processes._PollingTime`): prompt after work, slow when idle;
the SuperExec woken by its SuperNode instead."""

from __future__ import annotations

import os
import threading
import time

import pytest

from clients.flower_processes import (
    DOORBELL_ENV,
    LOCAL_WAIT_S,
    _Doorbell,
    _marking_work,
    _PollingTime,
    _SubprocessLaunchingPromptSuperExec,
)
from common.polling import ACTIVE_POLL_S, ACTIVE_WINDOW_S, IDLE_POLL_S, poll_pause


@pytest.mark.parametrize(("idle_s", "pause"), [
    (0.0, ACTIVE_POLL_S), (0.1, ACTIVE_POLL_S), (ACTIVE_WINDOW_S - 0.01, ACTIVE_POLL_S), (ACTIVE_WINDOW_S, IDLE_POLL_S),
    (3600.0, IDLE_POLL_S),
])
def test_a_poll_is_prompt_for_a_while_after_work_then_slow(idle_s, pause):
    assert poll_pause(idle_s) == pytest.approx(pause)


def test_a_patched_module_waits_for_work_by_its_idle_time_and_for_anything_else_briefly(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("clients.flower_processes.time.monotonic", lambda: now[0])
    clock = _PollingTime(poll_s=3)
    assert clock.pause(3) == ACTIVE_POLL_S  # just started
    now[0] += ACTIVE_WINDOW_S / 2
    assert clock.pause(3) == ACTIVE_POLL_S
    now[0] += 60
    assert clock.pause(3) == IDLE_POLL_S  # never Flower's 3 s
    assert clock.pause(0.5) == LOCAL_WAIT_S  # the SuperNode waiting for its own reply
    assert clock.pause(0.001) == 0.001  # never longer than Flower asked
    clock.worked()
    assert clock.pause(3) == ACTIVE_POLL_S


def test_only_calls_whose_result_is_work_mark_the_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("clients.flower_processes.time.monotonic", lambda: now[0])
    clock = _PollingTime(poll_s=3)
    rings = []
    pull = _marking_work(lambda run_id: run_id, clock, when=lambda run_id: run_id is not None,
                         also=lambda: rings.append(now[0]))
    now[0] = 50.0
    assert pull(None) is None and clock.pause(3) == IDLE_POLL_S and rings == []  # nothing pulled: still idle
    assert pull(7) == 7 and clock.pause(3) == ACTIVE_POLL_S and rings == [50.0]  # and the SuperExec is rung


# The SuperExec's doorbell (`clients.flower_processes._Doorbell`): its SuperNode rings it when a
# message and its task are stored, so the SuperExec asks at once instead of at its next poll.

def _timed_sleep(clock: _PollingTime, seconds: float) -> float:
    started = time.monotonic()
    clock.sleep(seconds)
    return time.monotonic() - started


def test_a_superexec_waiting_for_work_starts_as_soon_as_its_supernode_rings():
    doorbell = _Doorbell()
    clock = _PollingTime(poll_s=60, doorbell=doorbell.read_fd)
    threading.Timer(0.2, doorbell.ring).start()
    assert _timed_sleep(clock, 60) < 30  # Flower's own wait would be the whole minute


def test_without_a_ring_the_superexec_waits_flowers_own_poll_and_rings_meanwhile_wake_it_once():
    doorbell = _Doorbell()
    clock = _PollingTime(poll_s=0.3, doorbell=doorbell.read_fd)
    assert _timed_sleep(clock, 0.3) >= 0.29  # not the 0.05 s active polls: the doorbell says when
    for _ in range(3):  # three messages stored while the SuperExec was busy launching
        doorbell.ring()
    assert _timed_sleep(clock, 0.3) < 0.29  # it asks once and finds them all
    assert _timed_sleep(clock, 0.3) >= 0.29  # the rings are used up


def test_a_superexec_whose_supernode_closed_the_doorbell_goes_back_to_polling():
    doorbell = _Doorbell()
    clock = _PollingTime(poll_s=3, doorbell=doorbell.read_fd)
    os.close(doorbell.write_fd)
    assert _timed_sleep(clock, 3) < 2.9  # the end of the pipe, not a ring: no busy loop from here on
    assert _timed_sleep(clock, 3) == pytest.approx(ACTIVE_POLL_S, abs=1.0)  # polling as without a doorbell


def test_ringing_never_blocks_the_supernode_not_even_when_nobody_reads():
    doorbell = _Doorbell()
    for _ in range(70_000):  # more rings than a pipe holds (64 KiB on Linux)
        doorbell.ring()
    os.close(doorbell.read_fd)  # the SuperExec is gone
    doorbell.ring()


def test_the_supernode_starts_its_superexec_with_the_doorbell_and_nothing_else_changed(monkeypatch):
    started = []
    monkeypatch.setattr("clients.flower_processes.subprocess.Popen",
                        lambda command, *args, **kwargs: started.append((command, kwargs)) or "process")
    doorbell = _Doorbell()
    launcher = _SubprocessLaunchingPromptSuperExec(doorbell)

    assert launcher.Popen(["flower-superexec", "--plugin-type", "clientapp"]) == "process"
    command, kwargs = started[0]
    assert command[1:] == ["-m", "clients.flower_processes", "superexec", "--plugin-type", "clientapp"]
    assert kwargs["pass_fds"] == (doorbell.read_fd,) and kwargs["env"][DOORBELL_ENV] == str(doorbell.read_fd)
    assert kwargs["env"]["PATH"] == os.environ["PATH"]  # the SuperNode's environment, as Flower passes it
    with pytest.raises(OSError):  # the SuperNode keeps no copy of the SuperExec's end
        os.fstat(doorbell.read_fd)

    launcher.Popen(["flwr-clientapp", "--token", "t"])
    assert started[1] == (["flwr-clientapp", "--token", "t"], {})  # any other process: as Flower starts it
