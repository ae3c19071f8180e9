"""vdisk.lab.machine, vdisk.lab.qmp and vdisk.lab.accel against a real QEMU, without a guest kernel.

QEMU runs paused (``-S``) for the QMP tests, or boots a 512-byte boot sector
that prints a line on the serial port and then echoes what it receives,
which is enough to test console capture, ``wait_for_line`` and
``console_write`` in a fraction of a second.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from vdisk.lab import accel, machine
from vdisk.lab.machine import Machine, MachineExited, MachineStartError, MachineTimeout, binary
from vdisk.lab.qmp import QmpCommandError, QmpTimeout

needs_qemu = pytest.mark.skipif(
    shutil.which(binary()) is None, reason=f"{binary()} is not installed (qemu-system-x86)"
)


def echo_boot_sector() -> bytes:
    """Real-mode code: print "VDISK-PROBE: READY" on COM1, then echo COM1 input back."""
    msg_addr = 0x7C00 + 0x40
    code = b"\xfa\x31\xc0\x8e\xd8"  # cli; xor ax,ax; mov ds,ax
    code += b"\xbe" + struct.pack("<H", msg_addr)  # mov si,msg
    code += b"\xba\xf8\x03"  # mov dx,0x3f8 (COM1 data)
    code += b"\xac\x84\xc0\x74\x03\xee\xeb\xf8"  # lodsb; test al,al; jz echo; out dx,al; jmp
    code += b"\xba\xfd\x03"  # echo: mov dx,0x3fd (line status)
    code += b"\xec\xa8\x01\x74\xfb"  # in al,dx; test al,1 (data ready); jz back to in
    code += b"\xba\xf8\x03\xec\xee"  # mov dx,0x3f8; in al,dx; out dx,al
    code += b"\xeb\xef"  # jmp echo
    sector = code.ljust(0x40, b"\x90") + b"VDISK-PROBE: READY\r\n\x00"
    return sector.ljust(510, b"\x00") + b"\x55\xaa"


@pytest.fixture
def echo_disk(tmp_path: Path) -> list[str]:
    path = tmp_path / "echo.img"
    path.write_bytes(echo_boot_sector())
    return ["-drive", f"file={path},format=raw,if=ide"]


def gone(pid: int) -> bool:
    """True once the process no longer exists (exited and reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- accelerator detection -------------------------------------------------------


def fake_host(tmp_path: Path, *, flags: str, pvm: bool, kvm: bool = True) -> dict[str, Path]:
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_bytes(b"")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    modules = tmp_path / "module"
    (modules / "kvm").mkdir(parents=True)
    if pvm:
        (modules / "kvm_pvm").mkdir()
    return {"dev_kvm": dev, "cpuinfo": cpuinfo, "sys_module": modules}


def test_kvm_unusable_without_dev_kvm(tmp_path: Path) -> None:
    host = fake_host(tmp_path, flags="vmx", pvm=False, kvm=False)
    assert "does not exist" in (accel.kvm_unusable_reason(**host) or "")


def test_kvm_unusable_without_hardware_virtualization(tmp_path: Path) -> None:
    host = fake_host(tmp_path, flags="lm nx", pvm=True)
    assert "no vmx or svm" in (accel.kvm_unusable_reason(**host) or "")


def test_kvm_unusable_with_kvm_pvm(tmp_path: Path) -> None:
    host = fake_host(tmp_path, flags="svm", pvm=True)
    assert "kvm_pvm" in (accel.kvm_unusable_reason(**host) or "")


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_kvm_usable_with_hardware_virtualization(tmp_path: Path, flag: str) -> None:
    assert accel.kvm_unusable_reason(**fake_host(tmp_path, flags=flag, pvm=False)) is None


@pytest.mark.parametrize("name", ["kvm", "tcg"])
def test_vdisk_accel_overrides_detection(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("VDISK_ACCEL", name)
    machine.detect_accel.cache_clear()
    try:
        assert machine.detect_accel() == machine.Accel(name, "VDISK_ACCEL")
    finally:
        machine.detect_accel.cache_clear()


@needs_qemu
def test_detect_accel_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM only if nothing speaks against it and QEMU enables it; else TCG with a reason."""
    monkeypatch.delenv("VDISK_ACCEL", raising=False)
    machine.detect_accel.cache_clear()
    try:
        chosen = machine.detect_accel()
    finally:
        machine.detect_accel.cache_clear()
    if chosen.name == "kvm":
        assert accel.kvm_unusable_reason() is None
        assert machine.probe_kvm() is None
    else:
        assert chosen.name == "tcg"
        assert chosen.reason == (accel.kvm_unusable_reason() or machine.probe_kvm())


# --- QMP ---------------------------------------------------------------------------


@needs_qemu
def test_qmp_query_status_of_paused_machine(tmp_path: Path) -> None:
    with Machine(tmp_path, paused=True, accel="tcg") as vm:
        assert vm.qmp.greeting is not None
        assert vm.qmp.greeting["QMP"]["version"]["qemu"]["major"] >= 7
        status = vm.qmp.execute("query-status")
        assert status["running"] is False
        assert status["status"] == "prelaunch"


@needs_qemu
def test_qmp_cont_and_stop_emit_events(tmp_path: Path) -> None:
    with Machine(tmp_path, paused=True, accel="tcg") as vm:
        vm.qmp.execute("cont")
        vm.qmp.wait_event("RESUME", timeout=10)
        assert vm.qmp.execute("query-status")["running"] is True
        vm.qmp.execute("stop")
        event = vm.qmp.wait_event("STOP", timeout=10)
        assert "timestamp" in event
        assert vm.qmp.execute("query-status")["status"] == "paused"


@needs_qemu
def test_qmp_error_reply_raises(tmp_path: Path) -> None:
    with Machine(tmp_path, paused=True, accel="tcg") as vm:
        with pytest.raises(QmpCommandError) as e:
            vm.qmp.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        with pytest.raises(QmpCommandError) as e:
            vm.qmp.execute("query-block-jobs", {"bogus": 1})
        assert e.value.error_class == "GenericError"
        assert vm.qmp.execute("query-block-jobs") == []  # still usable


@needs_qemu
def test_qmp_wait_event_has_a_deadline(tmp_path: Path) -> None:
    with Machine(tmp_path, paused=True, accel="tcg") as vm:
        with pytest.raises(QmpTimeout):
            vm.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=0.2)


# --- serial console ------------------------------------------------------------------


@needs_qemu
def test_console_is_captured_and_answers_input(tmp_path: Path, echo_disk: list[str]) -> None:
    with Machine(tmp_path, args=echo_disk, accel="tcg", name="echo") as vm:
        assert vm.wait_for_line(r"^VDISK-PROBE: (\w+)$", timeout=30).group(1) == "READY"
        vm.console_write("first line\nsecond line\n")
        assert vm.wait_for_line("line", timeout=30).group(0) == "line"
        second = vm.wait_for_line("line", timeout=30)  # continues after the previous match
        assert second.string == "second line"
        # from the start again
        assert vm.wait_for_line("READY", timeout=1, since=0).string == "VDISK-PROBE: READY"
    log = (tmp_path / "echo.console.log").read_bytes()
    assert log == b"VDISK-PROBE: READY\r\nfirst line\nsecond line\n"


@needs_qemu
def test_wait_for_line_times_out_with_the_console_tail(
    tmp_path: Path, echo_disk: list[str]
) -> None:
    with Machine(tmp_path, args=echo_disk, accel="tcg") as vm:
        vm.wait_for_line("READY", timeout=30)
        with pytest.raises(MachineTimeout) as e:
            vm.wait_for_line("never printed", timeout=0.3)
        assert "VDISK-PROBE: READY" in e.value.console_tail


@needs_qemu
def test_wait_for_line_reports_qemu_exit(tmp_path: Path, echo_disk: list[str]) -> None:
    with Machine(tmp_path, args=echo_disk, accel="tcg") as vm:
        vm.wait_for_line("READY", timeout=30)
        vm.qmp.execute("quit")
        with pytest.raises(MachineExited) as e:
            vm.wait_for_line("never printed", timeout=30)
        assert e.value.returncode == 0
        assert vm.wait(timeout=10) == 0


# --- cleanup ---------------------------------------------------------------------------


@needs_qemu
def test_leaving_the_context_stops_qemu(tmp_path: Path) -> None:
    with Machine(tmp_path, paused=True, accel="tcg") as vm:
        pid = vm.pid
        assert pid is not None and not gone(pid)
    assert gone(pid)
    assert vm.returncode == 0  # QMP quit, not a signal


@needs_qemu
def test_an_exception_in_the_context_stops_qemu(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="test body failed"):
        with Machine(tmp_path, paused=True, accel="tcg") as vm:
            pid = vm.pid
            raise RuntimeError("test body failed")
    assert pid is not None and gone(pid)


@needs_qemu
def test_unresponsive_qemu_is_killed(tmp_path: Path) -> None:
    """SIGSTOP makes QEMU deaf to QMP and SIGTERM; shutdown still ends it."""
    vm = Machine(tmp_path, paused=True, accel="tcg")
    with vm:
        assert vm.pid is not None
        os.kill(vm.pid, 19)  # SIGSTOP
        assert vm.shutdown(timeout=0.5) == -9
    assert gone(vm.pid)


@needs_qemu
def test_bad_arguments_fail_start_with_qemu_stderr(tmp_path: Path) -> None:
    vm = Machine(tmp_path, args=["-device", "no-such-device"], accel="tcg")
    with pytest.raises(MachineStartError) as e:
        vm.start()
    assert "no-such-device" in e.value.stderr
    assert vm.pid is not None and gone(vm.pid)


def test_missing_binary_fails_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMU", str(tmp_path / "no-such-qemu"))
    with pytest.raises(MachineStartError, match="cannot run"):
        Machine(tmp_path, accel="tcg").start()
