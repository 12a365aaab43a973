"""The ClientApp Flower loads: imports nothing but Flower, forwards every message to the site worker.

Flower 1.32 runs a new ``flwr-clientapp`` process per message; this app keeps that process
cheap. On a deployed site (a SuperNode started through `clients.flower_processes`, as ``mammofl
site run`` does, whose node config names its ``state-dir``) it hands the message and context to
the site's long-lived worker (`clients.site_worker`), starting one for this app version if none
answers, and returns the worker's reply with the context's state brought back (SecAgg+ keeps its
keys there between messages). The worker lives as long as that SuperNode (``MAMMOFL_SITE_PID``).
Anywhere else -- ``flwr run`` simulations, a SuperNode started by hand -- and whenever the worker
cannot be started, it runs the real ClientApp (`clients.client_app`) in this process, as before:
the worker is a speed-up, never a dependency.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.flower_processes import SITE_PID_ENV
from clients.site_worker import alive, running_worker, worker_files
from clients.worker_protocol import ProtocolError, call_worker, decode_recorddict, encode_call

logger = logging.getLogger("mammofl.thin_app")
WORKER_START_TIMEOUT_S = 300.0
APP_DIR = Path(__file__).resolve().parents[1]


class WorkerUnavailable(Exception):
    """No worker could be reached or started: the message is run in this process instead."""


class WorkerFailed(RuntimeError):
    """The real ClientApp raised in the worker (its type and message, as it would have here)."""


class ForwardingClientApp(ClientApp):
    """A ClientApp whose every message, of any type, goes to the site worker."""

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            return forward(message, context)
        except WorkerUnavailable as reason:
            logger.warning("site worker unavailable (%s); running the ClientApp in this process", reason)
            from clients.client_app import app as client_app

            return client_app(message, context)


def forward(message: Message, context: Context) -> Message:
    state_dir = context.node_config.get("state-dir")
    if state_dir is None:
        raise WorkerUnavailable("not a deployed site (no state-dir in the node config)")
    if not os.environ.get(SITE_PID_ENV, "").isdigit():
        raise WorkerUnavailable(f"no {SITE_PID_ENV}: this SuperNode was not started through clients.flower_processes")
    site_pid = int(os.environ[SITE_PID_ENV])
    info_path, log_path = worker_files(Path(str(state_dir)), APP_DIR)
    info = running_worker(info_path, site_pid) or _start_worker(info_path, log_path, site_pid)
    header, buffers = encode_call(message, context)
    try:
        answer, answer_buffers = call_worker(info, header, buffers)
    except (OSError, ProtocolError) as error:
        raise WorkerUnavailable(f"{type(error).__name__}: {error}") from error
    if "error" in answer:
        raise WorkerFailed(f"{answer['error']['type']}: {answer['error']['message']}")
    context.state = decode_recorddict(answer["state"], answer_buffers)
    return Message(decode_recorddict(answer["content"], answer_buffers), reply_to=message)


def _start_worker(info_path: Path, log_path: Path, site_pid: int) -> dict:
    """Starts this app version's worker (one at a time: a lock beside its info file) and waits until it listens."""
    with open(info_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = running_worker(info_path, site_pid)
        if info is not None:
            return info
        _wait_for_predecessor(info_path)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")])}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "clients.site_worker", "--app-dir", str(APP_DIR), "--info", str(info_path),
                 "--site-pid", str(site_pid)],
                cwd=APP_DIR, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)  # outlives this ClientApp process; stops with the site
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise WorkerUnavailable(f"the worker exited with {process.returncode} on start; see {log_path}")
            info = running_worker(info_path, site_pid)
            if info is not None:
                return info
            time.sleep(0.05)
        process.kill()
        raise WorkerUnavailable(f"the worker did not listen within {WORKER_START_TIMEOUT_S:.0f} s; see {log_path}")


def _wait_for_predecessor(info_path: Path, timeout_s: float = 10.0) -> None:
    """A worker of a killed SuperNode stops within a second (it watches that SuperNode); wait for
    it, so that two workers never write the site's privacy state at once."""
    try:
        pid = int(json.loads(info_path.read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        info_path.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            raise WorkerUnavailable(f"the previous worker {pid} has not stopped")
        time.sleep(0.05)
    info_path.unlink(missing_ok=True)


app = ForwardingClientApp()
