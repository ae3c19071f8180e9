"""The ``vdisk`` command line.

    vdisk datastore init DIR
    vdisk disk create|import|list|info|remove ... -d DIR
    vdisk serve -d DIR (--unix SOCK | --port PORT) [--tls-psk FILE] [--detach --pidfile FILE]
    vdisk snapshot DISK -d DIR
    vdisk consolidate DISK -d DIR [--into IMAGE | --to NEWFILE] [--no-pivot]
    vdisk job list|show|complete|cancel|resume ... -d DIR
    vdisk backup DISK --to FILE -d DIR
    vdisk info IMAGE;  vdisk identity stamp IMAGE
    vdisk replicate (DISK... -d DIR | IMAGE) --to TARGET_DIR [--name NAME] [--verify]

Human output by default, one JSON object on stdout with ``--json``. Exit
code 0 on success; otherwise one line ``vdisk: error: REASON`` on stderr and
exit code 1 (2 for a bad command line, 130 when interrupted, 143 on
SIGTERM, after the same clean-up as for Ctrl-C). The commands
live in ``cli_disk`` (datastores and disks), ``cli_serve`` and ``cli_jobs``
(snapshot, consolidation, jobs, backup) and ``cli_replicate`` (content
identity, replication).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

# blockpath makes vdisk_block (the block engine beside the plugin) importable
from . import __version__, blockpath, cli_disk, cli_jobs, cli_replicate, cli_serve  # noqa: F401
from .cli_common import EXIT_USAGE, Parser, UsageError, one_line
from .errors import Error

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def build_parser() -> Parser:
    parser = Parser(prog="vdisk", description="Layered qcow2 disks served over NBD: "
                    "datastores, snapshots, online consolidation, backups.")
    parser.add_argument("--version", action="version", version=f"vdisk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every external command and control message to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_disk.add_parsers(sub)
    cli_serve.add_parsers(sub)
    cli_jobs.add_parsers(sub)
    cli_replicate.add_parsers(sub)
    return parser


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


def _fail(reason: str, code: int) -> int:
    sys.stdout.flush()
    sys.stderr.write(f"vdisk: error: {one_line(reason)}\n")
    sys.stderr.flush()
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwound like Ctrl-C, so that every command cleans up after itself
    (cancels its job, removes its temporary files, stops what it started)."""


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    from vdisk_block.errors import ImageError

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    _setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code: int = args.func(args)
        return code
    except cli_jobs.JobInterrupted as e:
        return _fail(str(e), EXIT_TERMINATED if isinstance(e.__context__, Terminated)
                     else EXIT_INTERRUPTED)
    except Terminated:
        return _fail("terminated", EXIT_TERMINATED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except (Error, ImageError) as e:
        return _fail(str(e), EXIT_FAILURE)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}", EXIT_FAILURE)
    except argparse.ArgumentTypeError as e:
        return _fail(str(e), EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
