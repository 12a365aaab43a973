"""A deployed site's tasks handed to its long-lived worker instead of a new ``flwr-clientapp``.

Flower 1.32's SuperExec launches a fresh ``flwr-clientapp`` process for every task (one per
message): 1.8-2.3 s from its start to the moment it hands the message to the ClientApp, most of
a deployed round. Our SuperExec (``python -m clients.flower_processes superexec``) runs Flower's
own loop with `HandoffClientAppPlugin`: when the site's worker for the run's app version is
running (the thin app starts it on that version's first message, `clients.thin_app`), the plugin
gives the worker the task's single-use token over loopback (with the worker's own token), and the
worker does what ``flwr-clientapp`` does -- pulls the message and context from the SuperNode's
ClientAppIo API, sends task heartbeats, runs the ClientApp, pushes the reply and the context --
in a process that already holds torch, the model and the site's data (`run_task`). Otherwise (the
first message of an app version, a worker gone) the task is launched as Flower launches it.

Flower's pieces used here are private (the SuperExec plugin, ``run_clientapp``'s pull and push
helpers): the Flower version is pinned and `tests/test_flower_contract.py` fails when they move.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.grpc import create_channel
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_grpc
from flwr.supercore.interceptors import AppIoTokenClientInterceptor, RuntimeVersionClientInterceptor
from flwr.supercore.retry import make_simple_grpc_retry_invoker, wrap_stub
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import ClientAppExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from clients.flower_processes import SITE_PID_ENV, SITE_STATE_ENV
from clients.site_worker import running_worker, worker_files
from clients.worker_protocol import ProtocolError, call_worker
from common.flower_retries import prompt_object_retries

logger = logging.getLogger("mammofl.task_handoff")


class HandoffClientAppPlugin(ClientAppExecPlugin):
    """Flower's ClientApp plugin, handing tasks to the site's worker when it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app_dirs: dict[int, Path] = {}

    def launch_task(self, token: str, task: Task) -> LaunchResult:
        try:
            if self._hand_over(token, task):
                return LaunchResult.accepted()
        except (OSError, ProtocolError, ValueError, KeyError) as error:
            logger.warning("task %d not handed to the site worker (%s: %s); launching flwr-clientapp",
                           task.task_id, type(error).__name__, error)
        return super().launch_task(token, task)

    def _hand_over(self, token: str, task: Task) -> bool:
        state_dir, site_pid = os.environ.get(SITE_STATE_ENV), os.environ.get(SITE_PID_ENV, "")
        if not state_dir or not site_pid.isdigit():
            return False
        info = running_worker(worker_files(Path(state_dir), self._app_dir(task.run_id))[0], int(site_pid))
        if info is None:
            return False
        # Giving up on a worker that has the task could have it and a flwr-clientapp both run it;
        # it acknowledges before it starts, so a worker that dies unacknowledged never ran it.
        answer, _ = call_worker(info, {"task": {"token": token, "appio": self.appio_api_address,
                                                "insecure": self.insecure,
                                                "root_certificates": self.root_certificates_path}}, [])
        return answer.get("accepted") is True

    def _app_dir(self, run_id: int) -> Path:
        """Where Flower installed the run's app bundle: the folder its worker was started from."""
        if run_id not in self._app_dirs:
            from flwr.common.config import get_project_dir

            run = self.get_run(run_id)
            self._app_dirs[run_id] = get_project_dir(run.fab_id, run.fab_version, run.fab_hash).resolve()
        return self._app_dirs[run_id]


def run_task(client_app, *, token: str, appio: str, insecure: bool, root_certificates: str | None) -> str:
    """One task, as ``flwr-clientapp`` runs it (`flwr.supernode.runtime.run_clientapp`) minus
    installing and loading the app: this process already runs it. Returns the task's status."""
    # A worker asks at once, often while its SuperNode is still receiving the message (a
    # flwr-clientapp process takes seconds to start, so it rarely waits).
    prompt_object_retries(run_clientapp, "pull_and_inflate_object_from_tree")
    channel = create_channel(
        server_address=appio, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=[RuntimeVersionClientInterceptor(component_name="flwr-clientapp"),
                      AppIoTokenClientInterceptor(token)])
    stub = ClientAppIoStub(channel)
    retry_invoker = make_simple_grpc_retry_invoker()
    wrap_stub(stub, retry_invoker)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_grpc(stub))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    times = [time.perf_counter()]
    try:
        heartbeat.start()
        message, context, _, _ = pull_task_input(stub)
        times.append(time.perf_counter())
        reply = client_app(message=message, context=context)
        times.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - reported to the SuperNode as flwr-clientapp reports it
        logger.exception("the ClientApp raised")
        details = f"{type(error)}:<'{error}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(stub, reply, context)
        finally:
            retry_invoker.max_tries = 1
            push_task_output(stub=stub, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            channel.close()
            times.append(time.perf_counter())
            logger.info("task %s: %s", message.metadata.message_type if message is not None else "?",
                        " ".join(f"{name} {b - a:.2f} s" for name, a, b in zip(("pull", "app", "push"), times, times[1:])))
    return status
