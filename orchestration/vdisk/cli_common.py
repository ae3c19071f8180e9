"""What every ``vdisk`` subcommand shares: parsing, output, errors, the service.

Output rule: human text on stdout by default; with ``--json`` exactly one
JSON object on stdout and nothing else there. Errors are one line on stderr
(``vdisk: error: REASON``), raised anywhere as :class:`CliError` or as the
errors of the modules the commands use, and turned into the line and the
exit code by :func:`vdisk.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, NoReturn

from .control import Service
from .errors import Error
from .routing import open_service

EXIT_USAGE = 2


class CliError(Error):
    """A command cannot do what it was asked; ``reason`` is the one-line message.

    ``result`` is what the command got as far as reporting (a job that ended
    failed): with --json it goes into the error object.
    """

    msg = "{self.reason}"

    def __init__(self, reason: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result


class UsageError(Exception):
    """Bad command line: exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``vdisk: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- argument types ------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_DIGITS = 30       # more digits than any size a disk can have


def parse_size(text: str) -> int:
    """'10G' -> 10 GiB, '512M', '4096', '1.5G' (binary units; a multiple of 512 bytes).

    Exact (no floating point); how large a disk may be is for the command to say.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None or len(m.group(1)) > _SIZE_DIGITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 10G, 512M, 65536)")
    size = Fraction(m.group(1)) * (1 << _SHIFT[m.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    if size.denominator != 1 or size % 512:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: not a multiple of 512 bytes")
    return int(size)


def job_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid job id {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid job id {text!r}")
    return value


# --- parent parsers --------------------------------------------------------------------


def output_options() -> Parser:
    p = Parser(add_help=False)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def datastore_options() -> Parser:
    p = Parser(add_help=False)
    p.add_argument("-d", "--datastore", metavar="DIR", required=True,
                   help="the datastore directory")
    return p


def control_options() -> Parser:
    p = Parser(add_help=False)
    p.add_argument("--control", metavar="SOCK",
                   help="the control socket of the server (default: the one the "
                        "datastore records while it is served)")
    return p


# --- output ------------------------------------------------------------------------------


class Stdout:
    """Whether this run has printed its JSON object: a failure after it prints
    no second one."""

    printed = False


def emit(args: argparse.Namespace, obj: dict[str, Any], text: str | None = None) -> None:
    """Print ``obj`` as JSON with --json, else the human text (if any)."""
    if args.json:
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        Stdout.printed = True
    elif text:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def fail_with(args: argparse.Namespace, result: dict[str, Any], text: str,
              reason: str) -> NoReturn:
    """A command that got as far as a result, which says it failed: the human
    text on stdout, or with --json the result inside the error object."""
    if not args.json:
        emit(args, result, text)
    raise CliError(reason, result)


def one_line(text: str) -> str:
    return " / ".join(p.strip() for p in str(text).strip().splitlines() if p.strip()) \
        or "unknown error"


# --- the datastore's service ----------------------------------------------------------------


def datastore_dir(args: argparse.Namespace) -> str:
    directory = os.path.abspath(args.datastore)
    if not os.path.isdir(directory):
        raise CliError(f"{args.datastore}: no such datastore directory")
    return directory


@contextmanager
def service(args: argparse.Namespace) -> Iterator[Service]:
    """The datastore's service (served or in-process), closed on exit."""
    svc = open_service(datastore_dir(args), getattr(args, "control", None))
    try:
        yield svc
    finally:
        svc.close()


IMAGE_RULE = ("an absolute path, or relative to the datastore directory (as vdisk "
              "prints image paths), whatever the current directory")


def datastore_image(directory: str, given: str, *, exists: bool = True) -> tuple[str, str]:
    """An image of the datastore named on the command line: ``(path, argument)``.

    One rule for every such argument (--backing, --into, consolidate --to,
    ``vdisk info IMAGE -d DIR``): an absolute path is taken as it is, a relative
    one is relative to the datastore directory, which is how every image path
    the CLI prints is written. ``path`` is absolute; ``argument`` is what to
    pass the service (which reads paths the same way): ``given`` itself, so
    that its errors name the path as the user wrote it. The path must be in
    the datastore and, with ``exists``, be there.
    """
    path = os.path.normpath(os.path.join(directory, given))
    argument = given
    if not _inside(path, directory):
        real = os.path.realpath(path)
        if not _inside(real, os.path.realpath(directory)):
            raise CliError(f"{given} is outside the datastore {directory}")
        # in by symlinks only: the service gets the name relative to the datastore
        argument = os.path.relpath(real, os.path.realpath(directory))
    if exists and not os.path.exists(path):
        raise CliError(f"{given}: no such image in the datastore {directory}")
    return path, argument


def _inside(path: str, directory: str) -> bool:
    rel = os.path.relpath(path, directory)
    return rel != os.curdir and rel != os.pardir and not rel.startswith(os.pardir + os.sep)
