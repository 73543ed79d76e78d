"""The ``chronicle-agent`` command line: argument parsing and output, nothing else.

:func:`cli` is a function of its arguments that returns the exit code; :func:`main` is the
console script. Exit codes: 0 success; 1 the operation failed (a failed job, a refusal, a
verification error); 2 usage or configuration error; 3 the daemon is not reachable.
Logging handlers are installed here and only here, for the duration of one call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent.client import SocketClient
from agent.errors import (
    AgentError,
    ApiError,
    ConfigError,
    DaemonUnreachable,
    JobFailed,
    UsageError,
)
from agent.paths import SOCKET_ENV
from agent.progress import RECONNECT_S, RateMeter, follow_job, format_bytes, render
from agent.termsafe import visible

if TYPE_CHECKING:
    from agent.config import Settings

PROG = "chronicle-agent"
RUN_ID_ENV = "METHODIC_RUN_ID"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

log = logging.getLogger(__name__)


# ---- parsing ----------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser) -> None:
    """Options accepted before or after the subcommand (SUPPRESS: unset ones stay unset)."""
    g = parser.add_argument_group("global options")
    g.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                   help="settings file (default: $CHRONICLE_AGENT_CONFIG, else the "
                        "per-user or system config.toml)")
    g.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                   help="the daemon's socket (same as CHRONICLE_AGENT_SOCKET)")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging")
    g.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                   help="log line format (default: log.format from the settings)")


class _Parser(argparse.ArgumentParser):
    """``intermixed = True``: options may sit between positionals even where one of them
    is optional (argparse's plain parsing hands a lone positional to the first)."""

    intermixed = False
    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if not self.intermixed or self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True  # parse_known_intermixed_args calls back in here
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Upload/download sidecar for Chronicle assets.",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage or configuration error, "
               "3 daemon not reachable",
    )
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    def command(name: str, help_: str) -> _Parser:
        p: _Parser = sub.add_parser(name, help=help_, description=help_)
        _global_options(p)
        return p

    p = command("daemon", "run the daemon: socket API, queue, watcher, transfers")
    p.add_argument("--state-dir", metavar="DIR", help="overrides agent.state_dir")
    p.add_argument("--chronicle-url", metavar="URL",
                   help="overrides chronicle.url (empty: the embedded local server)")
    p.set_defaults(handler=cmd_daemon)

    p = command("server", "run the local Chronicle-compatible server on its own")
    p.add_argument("--storage", metavar="URL", help="file:///DIR or s3://BUCKET?endpoint=URL")
    p.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:8470")
    p.add_argument("--state-dir", metavar="DIR", help="overrides server.state_dir")
    p.add_argument("--public-url", metavar="URL",
                   help="base URL put into presigned disk-store URLs")
    p.set_defaults(handler=cmd_server)
    server_sub = p.add_subparsers(dest="server_command", metavar="SUBCOMMAND")
    gc = server_sub.add_parser(
        "gc", help="one storage sweep: remove what failures left in the local server's storage",
        description="One garbage-collection sweep of the local server's storage (the one "
                    "the server runs every server.gc_interval_s): bytes and multipart uploads "
                    "of abandoned and deleted assets, objects with no asset row, uploads no "
                    "pending component names. Prints what it removes. Safe beside a running "
                    "server; nothing written within server.gc_grace_s is touched.")
    _global_options(gc)
    gc.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")
    gc.add_argument("--grace", type=float, metavar="S",
                    help="overrides server.gc_grace_s for this sweep")
    gc.add_argument("--storage", metavar="URL", help="overrides server.storage")
    gc.add_argument("--state-dir", metavar="DIR", help="overrides server.state_dir")
    gc.set_defaults(handler=cmd_server_gc)

    p = command("upload", "upload a file or a directory as one asset, through the daemon")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--type", dest="asset_type", required=True, metavar="TYPE",
                   help="asset type, e.g. checkpoint")
    _upload_options(p)
    p.add_argument("--visibility", metavar="V", help="private, organization, team or public")
    p.set_defaults(handler=cmd_upload)

    p = command("upload-inline", "create a small inline asset (JSON or text)")
    p.add_argument("--type", dest="asset_type", required=True, metavar="TYPE")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", metavar="F",
                     help="text file (.md → text/markdown, .json → JSON, else text/plain)")
    src.add_argument("--json-content", metavar="JSON", help="the content, as JSON")
    _upload_options(p)
    p.add_argument("--visibility", metavar="V", help="private, organization, team or public")
    p.set_defaults(handler=cmd_upload_inline)

    p = command("download", "download an asset into an empty or new directory")
    p.usage = (f"{PROG} download (ASSET_ID | --run RUN --type TYPE --latest) DEST "
               "[--include GLOB]… [--exclude GLOB]… [--allow-invalid] [--json]")
    p.epilog = ("Globs match a component's whole name (a relative path such as "
                "shard/0001.bin) as Python's fnmatch does: * and ? match '/' too, [seq] one "
                "character of the set; case-sensitive. Example, one rank's shards and the "
                "checkpoint's metadata: --include '__3_*.distcp' --include .metadata. "
                "A selection of no component is an error.")
    p.intermixed = True  # ASSET_ID is optional: let DEST come after options as well
    p.add_argument("asset_id", nargs="?", metavar="ASSET_ID",
                   help="the asset (or choose it with --run, --type and --latest)")
    p.add_argument("dest", metavar="DEST",
                   help="a new or empty directory; missing parents are created")
    p.add_argument("--run", metavar="RUN", help="with --latest: the run whose asset to take")
    p.add_argument("--type", dest="asset_type", metavar="TYPE",
                   help="with --latest: the asset type, e.g. checkpoint")
    p.add_argument("--latest", action="store_true",
                   help="the newest ready asset of --run and --type (by creation time; "
                        "invalidated ones skipped unless --allow-invalid, deprecated ones "
                        "taken with a warning)")
    p.add_argument("--include", metavar="GLOB", action="append", default=[],
                   help="only the components whose names match (repeatable; none: all)")
    p.add_argument("--exclude", metavar="GLOB", action="append", default=[],
                   help="none of the components whose names match (repeatable; applied "
                        "after --include)")
    p.add_argument("--allow-invalid", action="store_true",
                   help="download (or, with --latest, choose) an invalidated asset anyway")
    p.add_argument("--json", action="store_true",
                   help="print {asset_id, dest, files} as JSON (and selected, with --latest)")
    p.set_defaults(handler=cmd_download)

    p = command("status", "the daemon's health: version, Chronicle, queue, rates")
    p.add_argument("--json", action="store_true",
                   help="the health object (with --watch: one JSON object per line)")
    p.add_argument("--watch", "-w", action="store_true",
                   help="a live view, redrawn every --interval seconds, with your running "
                        "and queued jobs (Ctrl-C ends it)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between redraws with --watch (default 1)")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="with --watch: stop after N views (default: until Ctrl-C)")
    p.set_defaults(handler=cmd_status)

    p = command("jobs", "list jobs")
    p.add_argument("--run", metavar="RUN_ID")
    p.add_argument("--state", metavar="STATE", type=_job_state,
                   help="queued, running, done, failed, cancelled, abandoned or lost")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_jobs)

    from agent.cli_runs import add_command as add_runs

    add_runs(command)

    p = command("exec", "run a training command as a child: one run, its output watched, "
                        "ended with the child's exit status")
    p.add_argument("--run", metavar="RUN_ID",
                   help="the run id (default: $METHODIC_RUN_ID, else a new one)")
    p.add_argument("--watch", metavar="DIR", action="append", default=[],
                   help="a directory whose entries are checkpoints (or a path glob); repeatable")
    p.add_argument("--type", dest="asset_type", metavar="TYPE", action="append", default=[],
                   help="asset type of the --watch before it (one for all, default checkpoint)")
    p.add_argument("--seal", metavar="KIND", action="append", default=[],
                   help="seal kinds for the --watch rules: marker, dcp_metadata, rename_dir, "
                        "rename_file, quiescence (repeatable; default: the watch rule default)")
    p.add_argument("--marker", metavar="NAME", action="append", default=[],
                   help="marker file names (default _SUCCESS, commit_success.txt)")
    p.add_argument("--copy-files", metavar="GLOB", action="append", default=[],
                   help="files copied at seal (rewritten in place by the writer)")
    p.add_argument("--quiescence-s", metavar="S", type=float,
                   help="quiescence fallback, in seconds (default 30)")
    p.add_argument("--on-exit", choices=("drain", "abandon"),
                   help="what a failed or crashed run's sealed checkpoints do (runs.on_exit)")
    p.add_argument("--nodes", metavar="N", type=int,
                   help="how many nodes write each checkpoint: above 1, every node's agent "
                        "joins one asset per checkpoint (default: $SLURM_NNODES, else 1)")
    p.add_argument("--node-rank", metavar="R", type=int,
                   help="this node's rank among them (default: $SLURM_NODEID, $GROUP_RANK "
                        "or $NODE_RANK)")
    p.add_argument("--shared", action="store_true",
                   help="with --nodes: every node sees each checkpoint whole (a shared "
                        "filesystem); the agents split its files between them (found by "
                        "itself on NFS, Lustre, GPFS... where a DCP or safetensors index "
                        "names only files present)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print neither the run id at the start nor the summary at the end")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND…")
    p.set_defaults(handler=cmd_exec)

    for name, help_ in (("cancel", "cancel a job"), ("retry", "retry a failed job")):
        p = command(name, help_)
        p.add_argument("job_id", metavar="JOB")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=cmd_cancel if name == "cancel" else cmd_retry)

    from agent.cli_assets import add_commands  # researcher side: assets …, me
    from agent.doctor import add_command as add_doctor

    add_commands(command)
    add_doctor(command)
    return parser


def _job_state(value: str) -> str:
    """``jobs --state``: one of the queue's states, else a usage error naming them."""
    from agent.queue.store import job_state

    try:
        return job_state(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _upload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="RUN_ID", help="the run (default: $METHODIC_RUN_ID)")
    p.add_argument("--content-type", metavar="T")
    p.add_argument("--wait", action="store_true",
                   help="wait for the asset to be ready, showing progress")
    p.add_argument("--json", action="store_true", help="print the job object")
    p.add_argument("--reconnect-s", type=float, default=RECONNECT_S, metavar="S",
                   help="with --wait: how long to wait for a daemon that went away (a "
                        f"restart) before leaving the job to it (default {RECONNECT_S:g})")


# ---- entry points -----------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    out: TextIO
    err: TextIO
    _settings: Settings | None = None

    def settings(self, overrides: dict[str, Any] | None = None) -> Settings:
        if self._settings is None or overrides:
            from agent.config import load_settings

            self._settings = load_settings(getattr(self.args, "config", None), overrides)
        return self._settings

    def client(self) -> SocketClient:
        settings = self.settings()
        return SocketClient(settings.socket_path(), token=settings.token())

    def print(self, text: str = "") -> None:
        """Human output: control characters from names and messages are made visible
        (agent/termsafe.py), never sent to the terminal."""
        print(visible(text, keep_newlines=True), file=self.out)

    def print_json(self, obj: Any, indent: int | None = 2) -> None:
        print(json.dumps(obj, indent=indent), file=self.out)

    def warn(self, text: str) -> None:
        print(visible(text, keep_newlines=True), file=self.err)


def main(argv: list[str] | None = None) -> int:
    """The console script ``chronicle-agent`` (and ``python -m agent``)."""
    return cli(*(sys.argv[1:] if argv is None else argv))


def cli(*args: str) -> int:
    """Run one command line; returns its exit code. Output goes to the current
    ``sys.stdout`` / ``sys.stderr``."""
    out, err = sys.stdout, sys.stderr
    try:
        ns = build_parser().parse_args(list(args))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    ctx = Ctx(ns, out, err)
    with _socket_env(getattr(ns, "socket", None)):
        try:
            with _logging(ctx):
                handler: Callable[[Ctx], int] = ns.handler
                return handler(ctx)
        except (ConfigError, UsageError) as e:
            return _fail(ctx, str(e), EXIT_USAGE)
        except DaemonUnreachable as e:
            return _fail(ctx, str(e), EXIT_UNREACHABLE)
        except ApiError as e:
            return _fail(ctx, f"{e.code}: {e.message}", EXIT_FAILED)
        except JobFailed as e:
            return _fail(ctx, str(e), EXIT_FAILED)
        except AgentError as e:
            return _fail(ctx, f"{e.code}: {e.message}", EXIT_FAILED)
        except KeyboardInterrupt:
            return 130


def _fail(ctx: Ctx, message: str, code: int) -> int:
    ctx.warn(f"{PROG}: error: {message}")
    return code


@contextmanager
def _socket_env(path: str | None) -> Iterator[None]:
    """``--socket`` sets CHRONICLE_AGENT_SOCKET for this call (the daemon reads it too)."""
    if path is None:
        yield
        return
    old = os.environ.get(SOCKET_ENV)
    os.environ[SOCKET_ENV] = str(Path(path).expanduser().absolute())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = old


# ---- logging ------------------------------------------------------------------------------

_STD_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


@contextmanager
def _logging(ctx: Ctx) -> Iterator[None]:
    """Install one stderr handler on the root logger for the duration of the command."""
    args = ctx.args
    long_running = args.command in ("daemon", "server") and not getattr(
        args, "server_command", None)
    fmt = getattr(args, "log_format", None)
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    elif long_running:
        level = logging.getLevelName(ctx.settings().log.level.upper())
    else:
        level = logging.WARNING
    if fmt is None and long_running:
        fmt = ctx.settings().log.format
    handler = logging.StreamHandler(ctx.err)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# ---- services -----------------------------------------------------------------------------


def cmd_daemon(ctx: Ctx) -> int:
    args = ctx.args
    overrides: dict[str, Any] = {}
    if args.state_dir:
        overrides.setdefault("agent", {})["state_dir"] = args.state_dir
    if args.chronicle_url is not None:
        overrides.setdefault("chronicle", {})["url"] = args.chronicle_url
    settings = ctx.settings(overrides)
    from agent.daemon import run_daemon  # type: ignore[import-not-found, attr-defined, unused-ignore]

    return int(run_daemon(settings))


def cmd_server(ctx: Ctx) -> int:
    args = ctx.args
    server = {
        key: value
        for key, value in (
            ("storage", args.storage),
            ("listen", args.listen),
            ("state_dir", args.state_dir),
            ("public_url", args.public_url),
        )
        if value is not None
    }
    settings = ctx.settings({"server": server} if server else None)
    from agent.statedir import private_umask

    private_umask()  # server.db holds signed URLs: every file it creates is private
    from agent.server.runner import serve_forever

    return int(serve_forever(settings))


def cmd_server_gc(ctx: Ctx) -> int:
    import asyncio

    from agent.progress import format_bytes, format_duration
    from agent.server.gc import SweepBusy, sweep_state_dir

    args = ctx.args
    if args.grace is not None and args.grace < 0:
        raise UsageError(f"--grace must be 0 or more seconds, got {args.grace:g}")
    server = {k: v for k, v in (("storage", args.storage), ("state_dir", args.state_dir))
              if v is not None}
    settings = ctx.settings({"server": server} if server else None)
    try:
        report = asyncio.run(sweep_state_dir(settings, dry_run=args.dry_run,
                                             grace_s=args.grace))
    except SweepBusy as e:
        return _fail(ctx, f"{e}; try again when it ends", EXIT_FAILED)
    if args.json:
        ctx.print_json(report.to_json())
        return EXIT_FAILED if report.errors else EXIT_OK
    if report.removed:
        ctx.print(format_table(("WHAT", "SIZE", "AGE", "KEY", "REASON"), [
            (r.item.kind, format_bytes(r.item.size), format_duration(r.age_s),
             r.item.key or r.item.ref,
             r.reason) for r in report.removed]))
    verb = "would remove" if report.dry_run else "removed"
    objects = sum(1 for r in report.removed if r.item.kind == "object")
    ctx.print(f"{verb} {objects} object(s), {format_bytes(report.bytes_removed)}, and "
              f"{len(report.removed) - objects} multipart upload(s); looked at "
              f"{report.objects_seen} object(s) and {report.uploads_seen} upload(s) in "
              f"{report.seconds:.1f}s; {report.too_recent} left for now (written within "
              f"{report.grace_s:g}s)")
    for error in report.errors:
        ctx.warn(f"{PROG}: error: {error}")
    return EXIT_FAILED if report.errors else EXIT_OK


# ---- transfers ----------------------------------------------------------------------------


def _existing_path(raw: str) -> Path:
    path = Path(os.path.abspath(Path(raw).expanduser()))
    if not path.exists():
        raise UsageError(f"no such file or directory: {raw}")
    return path


def _run_id(args: argparse.Namespace) -> str | None:
    return args.run or os.environ.get(RUN_ID_ENV) or None


def _put_opt(body: dict[str, Any], **values: Any) -> None:
    for key, value in values.items():
        if value is not None:
            body[key] = value


def cmd_upload(ctx: Ctx) -> int:
    args = ctx.args
    path = _existing_path(args.path)
    body: dict[str, Any] = {"path": str(path), "asset_type": args.asset_type}
    _put_opt(body, run_id=_run_id(args), content_type=args.content_type,
             visibility=args.visibility)
    client = ctx.client()
    job = client.request("POST", "/v1/uploads", body)
    return _report_job(ctx, client, job, wait=args.wait)


def _inline_content(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The content and content type of ``upload-inline``."""
    if args.json_content is not None:
        try:
            return json.loads(args.json_content), args.content_type
        except json.JSONDecodeError as e:
            raise UsageError(f"--json-content is not valid JSON: {e}") from None
    path = _existing_path(args.file)
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--file {args.file}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--file {args.file}: {e.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".json" and args.content_type is None:
        try:
            return json.loads(text), None
        except json.JSONDecodeError as e:
            raise UsageError(f"--file {args.file} is not valid JSON: {e}") from None
    if args.content_type is not None:
        return text, args.content_type
    return text, "text/markdown" if suffix in (".md", ".markdown") else "text/plain"


def cmd_upload_inline(ctx: Ctx) -> int:
    args = ctx.args
    content, content_type = _inline_content(args)
    body: dict[str, Any] = {"asset_type": args.asset_type, "content": content}
    _put_opt(body, content_type=content_type, run_id=_run_id(args), visibility=args.visibility)
    client = ctx.client()
    job = client.request("POST", "/v1/assets/inline", body)
    return _report_job(ctx, client, job, wait=args.wait)


def _report_job(ctx: Ctx, client: SocketClient, job: dict[str, Any], *, wait: bool) -> int:
    """Shared ending of upload and upload-inline: print the job id, or wait and report."""
    if not wait:
        if ctx.args.json:
            ctx.print_json(job)
        else:
            ctx.print(str(job["job_id"]))
        return EXIT_OK
    final = _wait(ctx, client, job)
    if ctx.args.json:
        ctx.print_json(final)
    elif final.get("state") == "done":
        ctx.print(str(final.get("asset_id")))
    return _job_exit(ctx, final)


def _wait(ctx: Ctx, client: SocketClient, job: dict[str, Any]) -> dict[str, Any]:
    try:
        final = follow_job(client, job, ctx.err, ctx.warn,
                           reconnect_s=getattr(ctx.args, "reconnect_s", RECONNECT_S))
    except KeyboardInterrupt:
        jid = job["job_id"]
        ctx.warn(f"interrupted: job {jid} goes on in the daemon "
                 f"(`{PROG} cancel {jid}` stops it)")
        raise
    for warning in final.get("warnings") or []:
        ctx.warn(f"warning: {warning}")
    return final


def _job_exit(ctx: Ctx, job: dict[str, Any]) -> int:
    if job.get("state") == "done":
        return EXIT_OK
    err = job.get("error") or {}
    detail = f": {err.get('code')}: {err.get('message')}" if err else ""
    ctx.warn(f"{PROG}: error: job {job.get('job_id')} ended {job.get('state')}{detail}")
    return EXIT_FAILED


def _download_target(args: argparse.Namespace) -> dict[str, Any]:
    """How ``download`` names the asset: ASSET_ID, or --run, --type and --latest."""
    if args.latest:
        if args.asset_id is not None:
            raise UsageError(f"give ASSET_ID or --latest, not both (ASSET_ID "
                             f"{args.asset_id!r} with --latest)")
        missing = [flag for flag, value in (("--run", args.run), ("--type", args.asset_type))
                   if not value]
        if missing:
            raise UsageError(f"--latest needs {' and '.join(missing)} (the run and the type "
                             "whose newest ready asset to download)")
        return {"run_id": args.run, "asset_type": args.asset_type, "latest": True}
    if args.run is not None or args.asset_type is not None:
        raise UsageError("--run and --type choose an asset only with --latest")
    if args.asset_id is None:
        raise UsageError("give ASSET_ID, or --run RUN --type TYPE --latest")
    return {"asset_id": args.asset_id}


def cmd_download(ctx: Ctx) -> int:
    args = ctx.args
    target = _download_target(args)
    dest = Path(os.path.abspath(Path(args.dest).expanduser()))
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{args.dest} exists and is not an empty directory")
    body: dict[str, Any] = {**target, "dest": str(dest), "allow_invalid": args.allow_invalid}
    _put_opt(body, include=args.include or None, exclude=args.exclude or None)
    client = ctx.client()
    final = _wait(ctx, client, client.request("POST", "/v1/downloads", body))
    if final.get("state") != "done":
        return _job_exit(ctx, final)
    result = final.get("result") or {}
    if not isinstance(result, dict):
        result = {}
    files = list(result.get("files") or [])
    asset_id = str(result.get("asset_id") or final.get("asset_id") or args.asset_id)
    selected = result.get("selected") or final.get("selected")
    if args.json:
        out: dict[str, Any] = {"asset_id": asset_id, "dest": str(dest), "files": files}
        out.update({k: result[k] for k in ("cached", "fetched", "fetched_bytes")
                    if k in result})
        if args.latest and selected:
            out["selected"] = selected
        ctx.print_json(out)
        return EXIT_OK
    if args.latest and isinstance(selected, dict):
        ctx.print(f"latest ready {args.asset_type} of run {args.run}: {asset_id} "
                  f"(created {selected.get('created_at')})")
    total = sum(int(f.get("size") or 0) for f in files)
    fetched = result.get("fetched")
    where = "" if not isinstance(fetched, int) else (
        " (all from the node cache)" if fetched == 0 else
        f" ({fetched} fetched, {len(files) - fetched} from the node cache)"
        if fetched < len(files) else "")
    ctx.print(f"{asset_id}: {len(files)} file(s), {format_bytes(total)} in {dest}{where}")
    return EXIT_OK


# ---- runs ---------------------------------------------------------------------------------


def _nodes(nodes: int | None, rank: int | None, env: Mapping[str, str]) -> dict[str, int]:
    """``exec``'s multi-node settings for its watch rules: the flags, else the launcher's
    variables (Slurm's, torchrun's node rank); nothing for one node."""
    def number(*names: str) -> int | None:
        for name in names:
            value = env.get(name, "")
            if value.isdigit():
                return int(value)
        return None

    nodes = nodes if nodes is not None else number("SLURM_NNODES") or 1
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, not {nodes}")
    if nodes == 1:
        return {}
    rank = rank if rank is not None else number("SLURM_NODEID", "GROUP_RANK", "NODE_RANK")
    if rank is None:
        raise UsageError(f"--nodes {nodes} needs this node's rank: --node-rank R (or "
                         "$SLURM_NODEID, $GROUP_RANK, $NODE_RANK); node 0 ends the run")
    if not 0 <= rank < nodes:
        raise UsageError(f"--node-rank {rank} is not one of 0-{nodes - 1} (--nodes {nodes})")
    return {"nodes": nodes, "node_rank": rank}


def cmd_exec(ctx: Ctx) -> int:
    from agent.runs.execwrap import rules_from_args, run_exec

    args = ctx.args
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    extra: dict[str, Any] = {}
    for key, value in (("seal", args.seal), ("markers", args.marker),
                       ("copy_files", args.copy_files), ("quiescence_s", args.quiescence_s)):
        if value:
            extra[key] = value
    extra.update(_nodes(args.nodes, args.node_rank, os.environ))
    if args.shared:
        if not extra:
            raise UsageError("--shared needs more than one node (--nodes N)")
        extra["shared"] = True
    rules = rules_from_args(args.watch, args.asset_type, extra)
    return run_exec(ctx.client(), command, run_id=args.run, rules=rules,
                    on_exit=args.on_exit, err=ctx.err, quiet=args.quiet)


# ---- the queue ----------------------------------------------------------------------------


def cmd_status(ctx: Ctx) -> int:
    client = ctx.client()
    if ctx.args.watch:
        return _status_watch(ctx, client)
    health = client.health()
    if ctx.args.json:
        ctx.print_json(health)
        return EXIT_OK
    ctx.print(_status_text(health, client))
    return EXIT_OK


def _status_text(health: dict[str, Any], client: SocketClient) -> str:
    queue = health.get("queue") or {}
    transfer = health.get("transfer") or {}
    rows = [
        ("version", str(health.get("version"))),
        ("socket", str(client.socket_path)),
        ("chronicle", str(health.get("chronicle_url") or "-")),
        ("queue", ", ".join(f"{k} {v}" for k, v in queue.items()) or "empty"),
        ("upload", f"{format_bytes(float(transfer.get('bytes_per_s_up') or 0))}/s"),
        ("download", f"{format_bytes(float(transfer.get('bytes_per_s_down') or 0))}/s"),
        ("staging", format_bytes(float(health.get("staging_bytes") or 0))),
        ("yielding", _yield_text(health.get("yield") or {})),
    ]
    return "\n".join(f"{key + ':':<11}{value}" for key, value in rows)


def _yield_text(y: dict[str, Any]) -> str:
    """Whether the daemon holds back for training, and why."""
    if not y:
        return "-"
    if y.get("reason"):
        return f"holding back: {y['reason']}"
    return (f"no (others use {y.get('others_cpu')} of {y.get('cpus')} CPU(s); bulk threads "
            f"{y.get('bulk_policy')})")


WATCH_JOBS_SHOWN = 20


def _status_watch(ctx: Ctx, client: SocketClient) -> int:
    """``status --watch``: the health and the caller's active jobs, redrawn in place on a
    terminal (one frame after another elsewhere; one JSON object per line with --json).
    A daemon that goes away (a restart) is reported in the view, which keeps trying."""
    args = ctx.args
    if args.interval <= 0:
        raise UsageError(f"--interval must be a positive number of seconds, not {args.interval}")
    tty = ctx.out.isatty() and not args.json
    meters: dict[str, RateMeter] = {}
    shown = 0
    try:
        while True:
            now = time.time()
            try:
                health = client.health()
                jobs = client.list_jobs(state="running") + client.list_jobs(state="queued")
            except DaemonUnreachable as e:
                frame: dict[str, Any] = {"time": now, "error": e.message}
                text = f"daemon unreachable: {e.message}"
            else:
                active = jobs[:WATCH_JOBS_SHOWN]
                for j in active:
                    meters.setdefault(str(j["job_id"]), RateMeter()).add(
                        time.monotonic(), int(j.get("bytes_done") or 0))
                frame = {"time": now, **health, "active_jobs": active}
                lines = [_status_text(health, client), ""]
                lines += [visible(f"{j['job_id']}  {j['kind']:<9} "
                                  f"{render(j, meters[str(j['job_id'])].rate())}")
                          for j in active]
                if len(jobs) > len(active):
                    lines.append(f"… and {len(jobs) - len(active)} more")
                if not jobs:
                    lines.append("no running or queued jobs of yours")
                text = "\n".join(lines)
            if args.json:
                print(json.dumps(frame, sort_keys=True), file=ctx.out)
            elif tty:  # our own escape (home, clear), then only visible text
                ctx.out.write("\x1b[H\x1b[J" + time.strftime("%H:%M:%S  ")
                              + visible(text, keep_newlines=True) + "\n")
            else:
                ctx.print(time.strftime("-- %H:%M:%S --"))
                ctx.print(text)
            ctx.out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return EXIT_UNREACHABLE if "error" in frame else EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _progress_cell(job: dict[str, Any]) -> str:
    total, done = int(job.get("bytes_total") or 0), int(job.get("bytes_done") or 0)
    if total <= 0:
        return format_bytes(done) if done else "-"
    return f"{done * 100 // total}% of {format_bytes(total)}"


def _error_cell(job: dict[str, Any]) -> str:
    err = job.get("error")
    if not err:
        return ""
    return f"{err.get('code')}: {err.get('message')}"


def format_jobs_table(jobs: list[dict[str, Any]]) -> str:
    return format_table(("JOB", "KIND", "STATE", "PROGRESS", "ASSET", "ERROR"), [
        (str(j.get("job_id")), str(j.get("kind")), str(j.get("state")), _progress_cell(j),
         str(j.get("asset_id") or "-"), _error_cell(j))
        for j in jobs])


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, the last one left ragged; one line per row,
    whatever the cells hold (control characters made visible)."""
    cells = [tuple(visible(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *cells]:
        padded = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def cmd_jobs(ctx: Ctx) -> int:
    jobs = ctx.client().list_jobs(run_id=ctx.args.run, state=ctx.args.state)
    if ctx.args.json:
        ctx.print_json({"jobs": jobs})
    elif jobs:
        ctx.print(format_jobs_table(jobs))
    else:
        ctx.warn("no jobs")
    return EXIT_OK


def _print_job(ctx: Ctx, job: dict[str, Any]) -> None:
    if ctx.args.json:
        ctx.print_json(job)
    else:
        ctx.print(format_jobs_table([job]))


def cmd_cancel(ctx: Ctx) -> int:
    _print_job(ctx, ctx.client().cancel_job(ctx.args.job_id))
    return EXIT_OK


def cmd_retry(ctx: Ctx) -> int:
    _print_job(ctx, ctx.client().retry_job(ctx.args.job_id))
    return EXIT_OK

