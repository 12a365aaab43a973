"""The long-lived site worker: one process per site and app version that keeps torch, the ClientApp
and the site's loaded data between messages.

Flower starts a fresh ``flwr-clientapp`` process for every message. Our ClientApp in it is the
thin one (`clients.thin_app`), which imports nothing but Flower and forwards the message to this
worker over a loopback socket; the worker runs the real ClientApp (`clients.client_app`, mods
and SecAgg+ included) and answers with the reply and the context's state. What a message costs
is then the work, not the imports (torch, opacus, torchvision) and the loading of the site.

The worker is started by the thin app on the first message of an app version, from that app's
own folder (Flower's installed FAB), so a new version runs in a new worker. It listens on
127.0.0.1 on a port of the system's choosing and accepts only callers presenting the token it
wrote, with its port, into ``<state-dir>/workers/<app key>.json`` (mode 0600, in the site's 0700
state folder): another local user can neither read the token nor reach the site's data through
it. It serves one message at a time, and exits at once when the site's SuperNode (whose pid it
is given) is gone, after ``--idle-timeout`` seconds without a message, or on SIGTERM; its log is
``<state-dir>/workers/<app key>.log``.

    python -m clients.site_worker --app-dir DIR --info FILE --site-pid PID [--idle-timeout S]
"""

from __future__ import annotations

import argparse
import hmac
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from hashlib import sha256
from pathlib import Path

from clients.flower_processes import SITE_THREADS_ENV
from clients.worker_protocol import (
    ProtocolError,
    decode_call,
    encode_failure,
    encode_reply,
    receive_frame,
    send_frame,
)

logger = logging.getLogger("mammofl.site_worker")
ACCEPT_POLL_S = 1.0
SITE_POLL_S = 0.2
DEFAULT_IDLE_TIMEOUT_S = 3600.0
APP_LOCK = threading.Lock()  # the ClientApp serves one message at a time, however it arrived


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_files(state_dir: Path, app_dir: Path) -> tuple[Path, Path]:
    """(info file, log file) of the worker of the app installed at `app_dir`, in the site's state folder."""
    key = sha256(str(app_dir).encode("utf-8")).hexdigest()[:16]
    folder = state_dir / "workers"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"{key}.json", folder / f"{key}.log"


def running_worker(info_path: Path, site_pid: int) -> dict | None:
    """The worker an info file names, when it runs and serves this SuperNode (a worker of a
    SuperNode that was killed and restarted is on its way out and is not used)."""
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        running = alive(int(info["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if running and info.get("site_pid") == site_pid else None


def write_info(path: Path, info: dict) -> None:
    """Atomically, owner-only: the thin app reads the port and token from here."""
    descriptor, temporary = tempfile.mkstemp(prefix=".worker-", dir=path.parent)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        json.dump(info, stream)
    os.replace(temporary, path)


def serve(app_dir: Path, info_path: Path, site_pid: int, idle_timeout_s: float,
          request_timeout_s: float = 60.0) -> int:
    sys.path.insert(0, str(app_dir))
    from clients.client_app import app as client_app  # the heavy imports, once
    importlib.import_module("clients.task_handoff")  # and Flower's task runtime, before the first task comes

    threads = os.environ.get(SITE_THREADS_ENV, "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))  # a share of a machine other sites use too

    token = secrets.token_hex(32)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(ACCEPT_POLL_S)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    threading.Thread(target=_exit_with_the_site, args=(site_pid,), daemon=True).start()
    write_info(info_path, {"port": server.getsockname()[1], "token": token, "pid": os.getpid(),
                           "site_pid": site_pid, "app_dir": str(app_dir)})
    logger.info("site worker %d serving app %s on port %d", os.getpid(), app_dir, server.getsockname()[1])
    last_call = time.monotonic()
    try:
        while not stopping:
            if time.monotonic() - last_call > idle_timeout_s and not APP_LOCK.locked():
                logger.info("idle for %.0f s; stopping", idle_timeout_s)
                break
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                _answer(connection, client_app, token, request_timeout_s)
            last_call = time.monotonic()
    finally:
        server.close()
        _remove_if_ours(info_path)
    return 0


def _exit_with_the_site(site_pid: int) -> None:
    """At once, even in the middle of a round: a SuperNode killed and restarted gets a new worker,
    and two workers must never write the site's privacy state together."""
    while alive(site_pid):
        time.sleep(SITE_POLL_S)
    logger.info("the site's SuperNode %d is gone; stopping", site_pid)
    logging.shutdown()
    os._exit(0)


def _answer(connection: socket.socket, client_app, token: str, request_timeout_s: float) -> None:
    # The thin app sends its whole request at once: a caller that sends nothing (or dribbles)
    # must not hold the site's only worker.
    connection.settimeout(request_timeout_s)
    try:
        header, buffers = receive_frame(connection)
    except (ProtocolError, OSError, ValueError) as error:
        logger.warning("a caller sent no valid frame (%s); closed", type(error).__name__)
        return
    if not hmac.compare_digest(str(header.get("token", "")), token):
        logger.warning("a caller without the worker's token was refused")
        return
    if isinstance(header.get("task"), dict):
        _serve_task(connection, client_app, header["task"])
        return
    connection.settimeout(None)  # a round of training takes as long as it takes
    started = time.perf_counter()
    try:
        message, context = decode_call(header, buffers)
        with APP_LOCK:
            reply = client_app(message, context)
        if reply.has_error():
            raise RuntimeError(f"the ClientApp answered with an error: {reply.error.reason}")
        answer = encode_reply(reply, context)
    except Exception as error:  # noqa: BLE001 - the thin app re-raises it in the ClientApp process
        logger.exception("the ClientApp raised on a %s message", header.get("metadata", {}).get("message_type"))
        answer = encode_failure(error)
    try:
        send_frame(connection, *answer)
    except OSError as error:
        logger.warning("the reply could not be sent (%s): the caller is gone", type(error).__name__)
    logger.info("%s message answered in %.2f s", header.get("metadata", {}).get("message_type"),
                time.perf_counter() - started)


def _serve_task(connection: socket.socket, client_app, task: dict) -> None:
    """A task our SuperExec handed over (`clients.task_handoff`): acknowledged at once, then run
    against the SuperNode's ClientAppIo API as flwr-clientapp would run it, in a thread of its own.

    A task can wait for its message for hours (a SuperLink restarted while its objects were on
    the way: Flower pulls for up to 2 h), as a flwr-clientapp process would; it must not stop the
    next one from running. The ClientApp itself runs one message at a time (`APP_LOCK`): training
    and the site's privacy state are not for two at once."""
    from clients.task_handoff import run_task

    try:
        arguments = {"token": str(task["token"]), "appio": str(task["appio"]), "insecure": bool(task["insecure"]),
                     "root_certificates": None if task["root_certificates"] is None else str(task["root_certificates"])}
        send_frame(connection, {"accepted": True}, [])
    except (KeyError, OSError) as error:
        logger.warning("a task hand-over could not be accepted (%s)", type(error).__name__)
        return

    def one_at_a_time(*, message, context):
        with APP_LOCK:
            return client_app(message, context)

    def serve_it() -> None:
        started = time.perf_counter()
        status = run_task(one_at_a_time, **arguments)
        logger.info("task served in this process (%s) in %.2f s", status, time.perf_counter() - started)

    threading.Thread(target=serve_it, name="task", daemon=True).start()


def _remove_if_ours(info_path: Path) -> None:
    try:
        if json.loads(info_path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            info_path.unlink()
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the site's long-lived ClientApp worker (started by the thin app)")
    parser.add_argument("--app-dir", type=Path, required=True)
    parser.add_argument("--info", type=Path, required=True)
    parser.add_argument("--site-pid", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S)
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="seconds a caller has to send its whole request (default 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.app_dir, args.info, args.site_pid, args.idle_timeout, args.request_timeout)


if __name__ == "__main__":
    sys.exit(main())
