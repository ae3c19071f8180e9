"""The ``vdisk`` command line.

    vdisk datastore init DIR
    vdisk disk create|import|list|info|remove ... -d DIR
    vdisk serve -d DIR (--unix SOCK | --port PORT) [--tls-psk FILE] [--detach --pidfile FILE]
    vdisk snapshot DISK -d DIR
    vdisk consolidate DISK -d DIR [--into IMAGE | --to NEWFILE] [--no-pivot]
    vdisk job list|show|complete|cancel|resume ... -d DIR
    vdisk backup DISK --to FILE -d DIR
    vdisk info (IMAGE | DISK -d DIR);  vdisk identity stamp IMAGE
    vdisk replicate (DISK... -d DIR | IMAGE) --to TARGET_DIR [--name NAME] [--verify]

``-v`` goes before or after the command. Human output by default, one JSON
object on stdout with ``--json`` (its fields: docs/cli.md). Exit code 0 on
success; otherwise one line ``vdisk: error: REASON`` on stderr and exit
code 1 (2 for a bad command line, 130 when interrupted, 143 on SIGTERM,
after the same clean-up as for Ctrl-C), and with ``--json`` the object
``{"error": REASON, "code": CODE}`` on stdout. A command or action left
out prints the usage. The commands
live in ``cli_disk`` (datastores and disks), ``cli_serve`` and ``cli_jobs``
(snapshot, consolidation, jobs, backup) and ``cli_replicate`` (content
identity, replication).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

# blockpath makes vdisk_block (the block engine beside the plugin) importable
from . import (  # noqa: F401  (blockpath: vdisk_block importable)
    __version__,
    blockpath,
    cli_disk,
    cli_jobs,
    cli_replicate,
    cli_serve,
    cli_snapshot,
)
from .cli_common import EXIT_USAGE, Parser, Stdout, UsageError, one_line
from .errors import Error

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def build_parser() -> Parser:
    parser = Parser(prog="vdisk", description="Layered qcow2 disks served over NBD: "
                    "datastores, snapshots, online consolidation, backups.")
    parser.add_argument("--version", action="version", version=f"vdisk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cli_disk.add_parsers(sub)
    cli_serve.add_parsers(sub)
    cli_snapshot.add_parsers(sub)
    cli_jobs.add_parsers(sub)
    cli_replicate.add_parsers(sub)
    _complete(parser)
    return parser


VERBOSE_HELP = "log every external command and control message to stderr"


def _complete(parser: argparse.ArgumentParser) -> None:
    """What every command of the tree takes, wherever it is written: ``-v``
    before or after the command; and a command or action left out prints the
    usage of the parser that wanted it."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        action.required = False
        parser.set_defaults(func=functools.partial(_usage, parser, action.metavar))
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            if sub.description is None:     # its --help says what it is, as its parent's
                sub.description = helps.get(name)
            sub.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP,
                             default=argparse.SUPPRESS)     # else it hides a -v given before
            _complete(sub)


def _usage(parser: argparse.ArgumentParser, what: str, _args: argparse.Namespace) -> int:
    sys.stderr.write(parser.format_help())
    raise UsageError(f"the following arguments are required: {what}")


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vdisk: %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
    else:
        # errors reach the user once, as the one-line message below
        root.addHandler(logging.NullHandler())


def _fail(reason: str, code: int, as_json: bool, result: Any = None) -> int:
    """The one-line error on stderr; with --json, also an error object on stdout
    (unless the command already printed its one object there)."""
    reason = one_line(reason)
    if as_json and not Stdout.printed:
        obj: dict[str, Any] = {"error": reason, "code": code}
        if result is not None:
            obj["result"] = result
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.stderr.write(f"vdisk: error: {reason}\n")
    sys.stderr.flush()
    return code


def _json_requested(argv: Sequence[str]) -> bool:
    """Whether a command line argparse refused asked for --json (or a prefix of it)."""
    for arg in argv:
        if arg == "--":
            break
        if len(arg) > 2 and "--json".startswith(arg):
            return True
    return False


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwound like Ctrl-C, so that every command cleans up after itself
    (cancels its job, removes its temporary files, stops what it started)."""


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated()


def _by_sigterm(e: BaseException) -> bool:
    """Whether SIGTERM (not Ctrl-C) is what the interrupt e comes from."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 16:
        if isinstance(cur, Terminated):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def main(argv: Sequence[str] | None = None) -> int:
    from vdisk_block.errors import ImageError

    argv = sys.argv[1:] if argv is None else list(argv)
    Stdout.printed = False
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE, _json_requested(argv))
    as_json = bool(getattr(args, "json", False))
    _setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code: int = args.func(args)
        return code
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE, as_json)
    except cli_jobs.JobInterrupted as e:
        return _fail(str(e), EXIT_TERMINATED if _by_sigterm(e) else EXIT_INTERRUPTED, as_json)
    except Terminated:
        return _fail("terminated", EXIT_TERMINATED, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, as_json)
    except (Error, ImageError) as e:
        return _fail(str(e), EXIT_FAILURE, as_json, getattr(e, "result", None))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}", EXIT_FAILURE, as_json)
    except argparse.ArgumentTypeError as e:
        return _fail(str(e), EXIT_USAGE, as_json)
    except sqlite3.Error as e:          # the catalog: full filesystem, locked, damaged
        return _fail(f"{args.datastore if getattr(args, 'datastore', None) else 'catalog'}: "
                     f"the catalog: {e}", EXIT_FAILURE, as_json)


if __name__ == "__main__":
    sys.exit(main())
