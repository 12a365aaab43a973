"""``mammofl`` subcommands for the serve area; `mammofl.cli` calls :func:`add_commands`.

``serve`` runs the REST service; ``api-keys`` manages its API keys directly on the store
(bootstrapping the first admin key of a site, or any site's keys).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _settings(args: argparse.Namespace):
    from api.settings import load_settings

    return load_settings(args.env_file)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.services import open_services
    from pydantic import ValidationError

    from api.settings import ApiSettings
    from common.errors import ConfigError

    settings = _settings(args)
    changes = {"allow_unchecked_models": True} if args.allow_unchecked_models else {}
    if args.certfile is not None or args.keyfile is not None:
        changes |= {"tls_certfile": args.certfile, "tls_keyfile": args.keyfile}
    if changes:
        try:
            settings = ApiSettings.model_validate(settings.model_dump() | changes)
        except ValidationError as error:
            raise ConfigError("; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())) from None
    if settings.allow_unchecked_models:
        logging.getLogger("mammofl.serve").warning(
            "allow_unchecked_models is on: variants without a model card, or whose privacy checks failed, are served")
    services = open_services(settings)
    uvicorn.run(create_app(settings, services), host=args.host, port=args.port, log_level=args.log_level,
                ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile)
    return 0


def _with_keys(args: argparse.Namespace, action) -> int:
    from api.auth import ApiKeys
    from api.services import open_store

    store, records = open_store(_settings(args))
    with store:
        return action(ApiKeys(records))


def _keys_create(args: argparse.Namespace) -> int:
    def create(keys) -> int:
        issued = keys.create(args.site, args.role, args.name, expires_in_days=args.expires_days)
        print(f"key_id {issued.record.key_id}  site {issued.record.site_id}  role {issued.record.role}")
        print(f"api key (shown once, store it now): {issued.api_key}")
        return 0

    return _with_keys(args, create)


def _keys_list(args: argparse.Namespace) -> int:
    def show(keys) -> int:
        for record in keys.list(args.site):
            state = (f"revoked {record.revoked_at.isoformat(timespec='seconds')}" if record.revoked_at else
                     f"expires {record.expires_at.isoformat(timespec='seconds')}" if record.expires_at else "active")
            used = record.last_used_at.isoformat(timespec="minutes") if record.last_used_at else "never used"
            print(f"{record.key_id}  {record.site_id}  {record.role:8}  {record.created_at.isoformat(timespec='seconds')}  "
                  f"{state}  last used {used}  {record.name}")
        return 0

    return _with_keys(args, show)


def _keys_revoke(args: argparse.Namespace) -> int:
    def revoke(keys) -> int:
        keys.revoke(args.key_id)
        print(f"revoked {args.key_id}")
        return 0

    return _with_keys(args, revoke)


def _audit_verify(args: argparse.Namespace) -> int:
    from api.audit import verify_chain
    from common.errors import ConfigError

    if not args.file.is_file():
        raise ConfigError(f"{args.file}: no such audit log (the service's MAMMOFL_API_AUDIT_LOG_PATH)")
    check = verify_chain(args.file)
    if check.broken_at is None:
        print(f"{args.file}: {check.lines} line(s), chain intact")
        return 0
    print(f"{args.file}: chain BROKEN at line {check.broken_at} of {check.lines}: {check.reason}")
    return 1


def add_commands(commands) -> None:
    """Adds this area's subcommands to the top-level subparsers ``commands``."""
    env_help = "a .env file of MAMMOFL_API_* settings (the environment wins over it)"
    serve = commands.add_parser(
        "serve", help="run the REST inference service (FastAPI, uvicorn)",
        description="Serve /v1 (uploads, predictions, models, keys), /healthz, /readyz, /metrics and the web "
        "front end. Settings come from MAMMOFL_API_* environment variables or --env-file; see api/README.md.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--env-file", type=Path, help=env_help)
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--certfile", type=Path, help="serve HTTPS with this PEM certificate (with --keyfile)")
    serve.add_argument("--keyfile", type=Path, help="the certificate's PEM private key")
    serve.add_argument("--allow-unchecked-models", action="store_true",
                       help="serve variants without a model card or whose card's privacy checks failed (logged)")
    serve.set_defaults(handler=_serve)

    audit = commands.add_parser("audit", help="the REST service's audit log: verify its hash chain")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)
    verify = audit_commands.add_parser("verify", help="check that no line of an audit log was edited, removed "
                                       "or inserted (exit 1 if one was)")
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.set_defaults(handler=_audit_verify)

    api_keys = commands.add_parser("api-keys", help="API keys of the REST service: create, list, revoke")
    key_commands = api_keys.add_subparsers(dest="api_keys_command", metavar="API_KEYS_COMMAND", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = key_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--env-file", type=Path, help=env_help)
        sub.set_defaults(handler=handler)
        return sub

    create = add("create", _keys_create, "issue a key for a site (printed once; only its hash is stored)")
    create.add_argument("--site", required=True, help="the site the key belongs to")
    create.add_argument("--role", required=True, choices=("reader", "uploader", "admin"))
    create.add_argument("--name", required=True, help="who or what holds the key (no patient data)")
    create.add_argument("--expires-days", type=float, default=None, help="the key stops working after this many days")
    listing = add("list", _keys_list, "list keys (ids, sites, roles, revoked or expiry, last use; never the keys)")
    listing.add_argument("--site", help="only this site's keys")
    revoke = add("revoke", _keys_revoke, "revoke a key by its id")
    revoke.add_argument("key_id")
