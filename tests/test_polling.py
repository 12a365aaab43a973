"""Two-speed polling (`common.polling`, `clients.flower_processes._PollingTime`): prompt after work, slow when idle."""

from __future__ import annotations

import pytest

from clients.flower_processes import LOCAL_WAIT_S, _marking_work, _PollingTime
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
    pull = _marking_work(lambda run_id: run_id, clock, when=lambda run_id: run_id is not None)
    now[0] = 50.0
    assert pull(None) is None and clock.pause(3) == IDLE_POLL_S  # nothing pulled: still idle
    assert pull(7) == 7 and clock.pause(3) == ACTIVE_POLL_S
