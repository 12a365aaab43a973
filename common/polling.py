"""How long a loop that polls for work waits before it asks again.

`ACTIVE_POLL_S` for `ACTIVE_WINDOW_S` seconds after its last work, `IDLE_POLL_S` from then on:
prompt between the messages of a round and between the rounds of a run (on this 2-core machine a
small round's messages follow each other within a second), about one request a second from a loop
that has been idle longer (a site training a real-size round for minutes, a deployment waiting
for its next run). The SuperNode of a site (`clients.flower_processes`) and the ServerApp's grid
(`server.prompt_grid`) poll this way; a site's SuperExec is rung by its SuperNode instead.

Measured (`bench/federation.py --rounds 12 --no-secure-aggregation`, 3 sites, same machine):
a fixed 0.05 s wait made three idle sites cost a sixth of the machine's CPU, in their processes
and the SuperLink's; a wait that grew with the idle time (a tenth of it) made the deployed round
0.9 s where the fixed wait gave 0.6 s, since every hop of a round (grid, SuperLink, SuperNode,
SuperExec, site worker) waited a little longer than the one before.
"""

from __future__ import annotations

ACTIVE_POLL_S = 0.05  # within ACTIVE_WINDOW_S of the last work
IDLE_POLL_S = 1.0  # from then on
ACTIVE_WINDOW_S = 10.0


def poll_pause(idle_s: float) -> float:
    """The wait before the next poll of a loop that last had work `idle_s` seconds ago."""
    return ACTIVE_POLL_S if idle_s < ACTIVE_WINDOW_S else IDLE_POLL_S
