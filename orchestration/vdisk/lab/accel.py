"""Which QEMU accelerator to use: KVM only when it can really run guests, else TCG.

    accel = detect_accel()      # Accel(name="tcg", reason="...")

A /dev/kvm alone proves little. KVM without hardware virtualization (kvm_pvm,
found in some sandboxes) opens /dev/kvm, and QEMU reports KVM enabled and runs
real-mode code with it, but a stock kernel hangs before printing anything. So
KVM is chosen only if /dev/kvm is usable, the CPU has vmx or svm, kvm_pvm is
not loaded, and QEMU started with ``-accel kvm`` reports KVM present and
enabled over QMP. ``$VDISK_ACCEL`` (``kvm`` or ``tcg``) overrides the detection.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why this one


def kvm_unusable_reason(
    dev_kvm: Path = Path("/dev/kvm"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
    sys_module: Path = Path("/sys/module"),
) -> str | None:
    """Why KVM cannot run a stock guest kernel here, or None if nothing speaks against it.

    A /dev/kvm alone proves little: KVM without hardware virtualization
    (kvm_pvm, found in some sandboxes) opens /dev/kvm and runs real-mode code,
    but a stock kernel hangs before printing anything.
    """
    if not dev_kvm.exists():
        return f"{dev_kvm} does not exist"
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return f"{dev_kvm} is not readable and writable"
    try:
        text = cpuinfo.read_text()
    except OSError as e:
        return f"cannot read {cpuinfo}: {e}"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    if not flags & {"vmx", "svm"}:
        return "the CPU has no hardware virtualization (no vmx or svm flag)"
    if (sys_module / "kvm_pvm").exists():
        return "KVM is kvm_pvm (no hardware virtualization), which cannot run stock kernels"
    return None


def probe_kvm(timeout: float = 20.0) -> str | None:
    """Start QEMU with ``-accel kvm`` (paused, no devices) and ask QMP ``query-kvm``.

    Returns why KVM is unusable, or None if QEMU reports it enabled.
    """
    from .machine import Machine, MachineError  # machine imports this module

    with tempfile.TemporaryDirectory(prefix="vdisk-kvm-probe-") as tmp:
        try:
            with Machine(tmp, accel="kvm", paused=True, memory_mb=64, start_timeout=timeout) as vm:
                state = vm.qmp.execute("query-kvm", timeout=timeout)
        except MachineError as e:
            return f"QEMU cannot start with -accel kvm: {e}"
    if not (state.get("present") and state.get("enabled")):
        return f"QEMU reports KVM {state}"
    return None


@functools.cache
def detect_accel() -> Accel:
    """KVM if it can really run guests, else TCG (decided once per process)."""
    forced = os.environ.get("VDISK_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return Accel(forced, "VDISK_ACCEL")
    reason = kvm_unusable_reason() or probe_kvm()
    if reason:
        log.info("Using TCG: %s", reason)
        return Accel("tcg", reason)
    return Accel("kvm", "hardware virtualization available and enabled by QEMU")
