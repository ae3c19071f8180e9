"""Whether KVM can run a stock guest kernel here: the checks that need no QEMU.

    reason = kvm_unusable_reason()      # None, or why not

A /dev/kvm alone proves little. KVM without hardware virtualization (kvm_pvm,
found in some sandboxes) opens /dev/kvm, and QEMU reports KVM enabled and runs
real-mode code with it, but a stock kernel hangs before printing anything. So
KVM is usable only if /dev/kvm is usable, the CPU has vmx or svm and kvm_pvm
is not loaded; :func:`vdisk.lab.machine.detect_accel` adds the last check,
QEMU started with ``-accel kvm`` reporting KVM present and enabled over QMP.
"""

from __future__ import annotations

import os
from pathlib import Path


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
