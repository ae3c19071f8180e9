"""Thin wrapper of qemu-img.

Argument lists only (never shell strings), ``--output=json`` wherever qemu-img
has it, and one error type, :class:`~vdisk.errors.QemuImgError`, carrying the
command, its exit code and its stderr. ``compare`` reports different contents
with the :class:`~vdisk.errors.ContentMismatch` subclass.

The binary is ``$QEMU_IMG`` if set, else ``qemu-img`` from ``$PATH``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import process
from .errors import ContentMismatch, ImageCorrupted, QemuImgError

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
OptionValue = str | int | bool

# qemu-img check exit codes: 0 clean, 1 check could not complete, 2 corruptions,
# 3 leaks only, 63 the format does not support checks.
CHECK_OK_CODES = (0, 2, 3)


def binary() -> str:
    return os.environ.get("QEMU_IMG", "qemu-img")


def _command(args: Sequence[StrPath]) -> list[str]:
    return [binary(), *(os.fspath(a) for a in args)]


def _json_args(args: Sequence[StrPath]) -> list[StrPath]:
    """``SUBCOMMAND --output=json ARGS...`` from ``SUBCOMMAND ARGS...``."""
    return [args[0], "--output=json", *args[1:]]


def run(
    args: Sequence[StrPath],
    *,
    ok_codes: Collection[int] = (0,),
) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img *args``; raise QemuImgError unless the exit code is in ok_codes."""
    return process.run(_command(args), QemuImgError, log=log, ok_codes=ok_codes)


def qemu_img_json(
    args: Sequence[StrPath],
    *,
    ok_codes: Collection[int] = (0,),
) -> Any:
    """Run ``qemu-img SUBCOMMAND --output=json ARGS...`` and parse its stdout.

    ``args[0]`` is the subcommand. Fails loudly (QemuImgError) unless JSON came back.
    """
    full = _json_args(args)
    cp = run(full, ok_codes=ok_codes)
    try:
        return json.loads(cp.stdout)
    except json.JSONDecodeError as e:
        stderr = f"expected JSON output ({e}); stderr: {cp.stderr}"
        raise QemuImgError(_command(full), cp.returncode, stderr, cp.stdout) from e


def _format_options(options: Mapping[str, OptionValue]) -> str:
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            text = "on" if value else "off"
        else:
            text = str(value)
        # qemu option syntax: a literal comma is written as two commas.
        parts.append(f"{key}={text.replace(',', ',,')}")
    return ",".join(parts)


def _backing_format(image: StrPath, backing: str) -> str | None:
    """The format of ``backing`` as referenced from ``image``, or None if it does not exist.

    A relative backing name is relative to the directory of the image, as in
    the qcow2 header.
    """
    path = Path(backing)
    if not path.is_absolute():
        path = Path(image).parent / path
    if not path.exists():
        return None
    return str(info(path, force_share=True)["format"])


def create(
    path: StrPath,
    fmt: str = "qcow2",
    size: int | str | None = None,
    backing: StrPath | None = None,
    backing_fmt: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
) -> None:
    """Create an image. With ``backing`` and no ``size``, the size is the backing's.

    ``backing`` is stored as given (use a name relative to the image's
    directory to keep a chain movable); its format is detected when
    ``backing_fmt`` is None (qemu-img requires it).
    """
    args: list[StrPath] = ["create", "-q", "-f", fmt]
    if backing is not None:
        backing = os.fspath(backing)
        if backing_fmt is None:
            backing_fmt = _backing_format(path, backing)
        args += ["-b", backing]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    if options:
        args += ["-o", _format_options(options)]
    args.append(path)
    if size is not None:
        args.append(str(size))
    run(args)


def info(
    path: StrPath,
    backing_chain: bool = False,
    *,
    fmt: str | None = None,
    force_share: bool = False,
) -> Any:
    """``qemu-img info``: a dict, or a list of dicts (top first) with ``backing_chain``."""
    args: list[StrPath] = ["info"]
    if fmt is not None:
        args += ["-f", fmt]
    if backing_chain:
        args.append("--backing-chain")
    if force_share:
        args.append("-U")
    args.append(path)
    return qemu_img_json(args)


def _check_args(
    path: StrPath, *, fmt: str | None, repair: str | None, force_share: bool
) -> list[StrPath]:
    args: list[StrPath] = ["check"]
    if fmt is not None:
        args += ["-f", fmt]
    if repair is not None:
        args += ["-r", repair]
    if force_share:
        args.append("-U")
    args.append(path)
    return args


def check(
    path: StrPath,
    *,
    fmt: str | None = None,
    repair: str | None = None,
    force_share: bool = False,
) -> dict[str, Any]:
    """``qemu-img check``: the parsed JSON, with ``corruptions`` and ``leaks`` always present.

    Corruptions (exit 2) and leaks (exit 3) are results, not errors; inspect
    the dict or use :func:`check_clean`. Raises QemuImgError when the check
    cannot be done (exit 1, or 63 for formats without checks such as raw).
    ``repair`` is ``"leaks"`` or ``"all"`` (``qemu-img check -r``).
    """
    args = _check_args(path, fmt=fmt, repair=repair, force_share=force_share)
    result: dict[str, Any] = qemu_img_json(args, ok_codes=CHECK_OK_CODES)
    # qemu-img leaves out the counters that are zero.
    result.setdefault("corruptions", 0)
    result.setdefault("leaks", 0)
    return result


def check_clean(
    path: StrPath,
    *,
    fmt: str | None = None,
    allow_leaks: bool = True,
) -> dict[str, Any]:
    """Check an image; raise ImageCorrupted if it has corruptions (or leaks, if not allowed).

    Leaked clusters waste space but lose no data; a crash may leave them.
    """
    result = check(path, fmt=fmt)
    if result["corruptions"] or (result["leaks"] and not allow_leaks):
        args = _check_args(path, fmt=fmt, repair=None, force_share=False)
        cmd = _command(_json_args(args))
        returncode = 2 if result["corruptions"] else 3
        raise ImageCorrupted(cmd, returncode, "", json.dumps(result), path=path, result=result)
    return result


def compare(
    a: StrPath,
    b: StrPath,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    force_share: bool = False,
) -> None:
    """Compare the guest-visible contents of two images.

    Returns None if they are equal; raises ContentMismatch (qemu-img exit 1)
    if they differ, QemuImgError on other failures. ``strict`` also fails on
    different sizes or allocation (``-s``).
    """
    args: list[StrPath] = ["compare"]
    if fmt_a is not None:
        args += ["-f", fmt_a]
    if fmt_b is not None:
        args += ["-F", fmt_b]
    if strict:
        args.append("-s")
    if force_share:
        args.append("-U")
    args += [a, b]
    cp = run(args, ok_codes=(0, 1))
    if cp.returncode == 1:
        log.debug("Images differ: %s", cp.stdout.strip())
        raise ContentMismatch(_command(args), cp.returncode, cp.stderr, cp.stdout)


def convert(
    src: StrPath,
    dst: StrPath,
    out_fmt: str = "raw",
    *,
    src_fmt: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
    compressed: bool = False,
    force_share: bool = False,
) -> None:
    """``qemu-img convert``: copy the guest-visible contents of src (whole chain) to dst."""
    args: list[StrPath] = ["convert", "-q"]
    if src_fmt is not None:
        args += ["-f", src_fmt]
    args += ["-O", out_fmt]
    if options:
        args += ["-o", _format_options(options)]
    if compressed:
        args.append("-c")
    if force_share:
        args.append("-U")
    args += [src, dst]
    run(args)


def commit(
    path: StrPath,
    *,
    fmt: str | None = None,
    base: StrPath | None = None,
    drop: bool = False,
) -> None:
    """``qemu-img commit``: write path's data into its backing (or ``base``).

    ``drop`` (``-d``) leaves path unchanged instead of emptying it.
    """
    args: list[StrPath] = ["commit", "-q"]
    if fmt is not None:
        args += ["-f", fmt]
    if base is not None:
        args += ["-b", base]
    if drop:
        args.append("-d")
    args.append(path)
    run(args)


def rebase(
    path: StrPath,
    backing: StrPath,
    backing_fmt: str | None = None,
    *,
    unsafe: bool = False,
    fmt: str | None = None,
) -> None:
    """``qemu-img rebase``: make ``backing`` the backing file of path.

    ``backing=""`` removes the backing file. ``unsafe`` (``-u``) only rewrites
    the name in the header. The backing format is detected when not given and
    the file exists.
    """
    backing = os.fspath(backing)
    args: list[StrPath] = ["rebase", "-q"]
    if fmt is not None:
        args += ["-f", fmt]
    if unsafe:
        args.append("-u")
    args += ["-b", backing]
    if backing and backing_fmt is None:
        backing_fmt = _backing_format(path, backing)
    if backing and backing_fmt is not None:
        args += ["-F", backing_fmt]
    args.append(path)
    run(args)


def map(  # named after the qemu-img subcommand; shadows the builtin in this module
    path: StrPath,
    *,
    fmt: str | None = None,
    force_share: bool = False,
) -> list[dict[str, Any]]:
    """``qemu-img map``: list of extents (start, length, depth, present, zero, data, offset)."""
    args: list[StrPath] = ["map"]
    if fmt is not None:
        args += ["-f", fmt]
    if force_share:
        args.append("-U")
    args.append(path)
    result: list[dict[str, Any]] = qemu_img_json(args)
    return result
