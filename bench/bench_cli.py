"""Command-line plumbing the benchmark scripts share.

Option defaults that depend on ``--quick``, comma lists checked against the
known names, logging, the scratch directory (removed unless ``--keep``), the
``--json`` document and the exit on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def apply_quick_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]) -> None:
    """Fill each option left unset with its (full, quick) default."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def comma_list(
    p: argparse.ArgumentParser, text: str, known: Sequence[str], what: str
) -> list[str]:
    """The names in ``text`` (comma separated); a usage error for one not in ``known``."""
    names = [x for x in text.split(",") if x]
    for bad in set(names) - set(known):
        p.error(f"unknown {what} {bad!r}")
    return names


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-5s %(message)s", datefmt="%H:%M:%S")


@contextmanager
def scratch_dir(parent: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """A new directory under ``parent`` (default $TMPDIR), removed afterwards unless ``keep``."""
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield workdir
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def environment(
    elapsed: float,
    load_before: tuple[float, float, float],
    lead: dict[str, Any] | None = None,
    middle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The host facts every ``--json`` document records; ``lead`` and ``middle`` add the
    script's own facts before the CPU count and before the elapsed time."""
    return {**(lead or {}), "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0], **(middle or {}), "elapsed_s": elapsed,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def write_json(path: Path, args: argparse.Namespace, env: dict[str, Any], **body: Any) -> None:
    """Write ``{"config": args, "environment": env, **body}`` to ``path``."""
    doc = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "environment": env, **body}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def run_main(main: Callable[[], int], stopped: str) -> None:
    """Exit with ``main()``'s status; on Ctrl-C say what was cleaned up and exit 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"interrupted; {stopped} stopped, scratch directory removed", file=sys.stderr)
        sys.exit(130)
