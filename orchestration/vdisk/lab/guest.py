"""The vdisk test guest: build it, configure its workload, read its console markers.

``vm-images/build OUTDIR`` makes ``OUTDIR/guest.qcow2`` and ``OUTDIR/guest.json``
(layout and build key); :func:`build` runs it and returns a :class:`GuestImage`.
The guest's /init reads its workload from the fw_cfg file ``opt/vdisk/config``
(``KEY=VALUE`` lines; :func:`config_text` renders them, :meth:`Machine` passes
them with ``fw_cfg={FW_CFG_NAME: text}``), falling back to ``vdisk.KEY=VALUE``
on the kernel command line of the image's syslinux.cfg (workload ``selftest``).
It reports on the serial console with ``VDISK-<WHAT>: ...`` lines, whose
``key=value`` words :func:`marker_fields` parses. vm-images/README.md lists
workloads, keys and markers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..errors import CommandError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILDER = REPO_ROOT / "vm-images" / "build"
FW_CFG_NAME = "opt/vdisk/config"
WORKLOADS = ("selftest", "writer", "nbdclient")

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_FIELD = re.compile(r"(\w+)=(\S*)")

ConfigValue = str | int | Sequence[str]


class GuestBuildError(CommandError):
    """vm-images/build failed."""

    msg = "Building the guest image failed (exit code {self.returncode}): {self.detail}"


def default_outdir() -> Path:
    """Where tests and the demo keep the built guest: ``$VDISK_GUEST_DIR``, else
    ``${XDG_CACHE_HOME:-~/.cache}/vdisk/guest`` (outside the source tree)."""
    if os.environ.get("VDISK_GUEST_DIR"):
        return Path(os.environ["VDISK_GUEST_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vdisk" / "guest"


@dataclass(frozen=True)
class GuestImage:
    """A built guest disk (qcow2) and its layout, from ``guest.json``."""

    path: Path
    key: str
    sha256: str
    kernel: str
    virtual_size: int
    boot_offset: int
    boot_size: int
    data_offset: int
    data_size: int

    @classmethod
    def load(cls, outdir: str | os.PathLike[str]) -> GuestImage:
        outdir = Path(outdir)
        info = json.loads((outdir / "guest.json").read_text())
        return cls(
            path=outdir / info["image"],
            key=info["key"],
            sha256=info["sha256"],
            kernel=info["kernel"],
            virtual_size=int(info["virtual_size"]),
            boot_offset=int(info["boot_partition"]["offset"]),
            boot_size=int(info["boot_partition"]["size"]),
            data_offset=int(info["data_partition"]["offset"]),
            data_size=int(info["data_partition"]["size"]),
        )


def build(outdir: str | os.PathLike[str] | None = None, *, timeout: float = 900.0) -> GuestImage:
    """Run ``vm-images/build OUTDIR`` (near-instant when cached) and load the result."""
    outdir = Path(outdir) if outdir is not None else default_outdir()
    cmd = [str(BUILDER), str(outdir)]
    cp = process.run(cmd, GuestBuildError, log=log, timeout=timeout)
    log.debug("Guest build: %s", cp.stderr.strip())
    return GuestImage.load(outdir)


def config_text(workload: str, **params: ConfigValue) -> str:
    """The guest configuration: ``workload=...`` then one ``KEY=VALUE`` line per
    parameter; a sequence value gives one line per item (``nbd_client_arg``)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
    lines = [f"workload={workload}"]
    for key, value in params.items():
        if not _KEY.match(key):
            raise ValueError(f"bad configuration key {key!r}")
        values = [value] if isinstance(value, str | int) else list(value)
        for item in values:
            text = str(item)
            if "\n" in text or "\r" in text:
                raise ValueError(f"configuration value of {key} spans lines: {text!r}")
            lines.append(f"{key}={text}")
    return "\n".join(lines) + "\n"


def marker_fields(text: str) -> dict[str, str]:
    """The ``key=value`` words of a marker line's text (``run=ab seq=3`` -> dict)."""
    return dict(_FIELD.findall(text))


def marker_pattern(what: str, body: str = r"(.*)") -> str:
    """A regex for a ``VDISK-<WHAT>: ...`` console line."""
    return rf"^VDISK-{re.escape(what.upper())}: {body}$"
