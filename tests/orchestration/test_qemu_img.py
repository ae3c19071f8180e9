"""vdisk.qemu_img and vdisk.qemu_io against the real qemu-img and qemu-io."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdisk import errors, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB
L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
QCOW_OFLAG_COPIED = 1 << 63


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    """base.raw <- mid.qcow2 <- top.qcow2, with a pattern in each layer, relative names."""
    base = tmp_path / "base.raw"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img.create(base, "raw", SIZE)
    qemu_io.run(base, "write -P 0x11 0 2M", fmt="raw")
    qemu_img.create(mid, backing="base.raw")
    qemu_io.run(mid, "write -P 0x22 1M 1M", fmt="qcow2")
    qemu_img.create(top, backing="mid.qcow2")
    qemu_io.run(top, "write -P 0x33 1536k 64k", fmt="qcow2")
    return [base, mid, top]


def expected_chain_raw(path: Path) -> Path:
    """The contents of the chain fixture, built independently as a raw image."""
    qemu_img.create(path, "raw", SIZE)
    qemu_io.run(
        path,
        "write -P 0x11 0 1M",
        "write -P 0x22 1M 512k",
        "write -P 0x33 1536k 64k",
        "write -P 0x22 1600k 448k",
        fmt="raw",
    )
    return path


def l2_entry_offset(image: Path) -> int:
    """File offset of the L2 entry of guest cluster 0 (which must be allocated)."""
    with open(image, "rb") as f:
        header = f.read(48)
        (l1_offset,) = struct.unpack_from(">Q", header, 40)
        f.seek(l1_offset)
        (l1_entry,) = struct.unpack(">Q", f.read(8))
    l2_offset = l1_entry & L2_OFFSET_MASK
    assert l2_offset, "guest cluster 0 has no L2 table"
    return l2_offset


def set_l2_entry(image: Path, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(l2_entry_offset(image))
        f.write(struct.pack(">Q", value))


@pytest.fixture
def written_qcow2(tmp_path: Path) -> Path:
    image = tmp_path / "image.qcow2"
    qemu_img.create(image, size=SIZE)
    qemu_io.run(image, "write -P 0x5a 0 64k")
    return image


@contextlib.contextmanager
def qemu_io_holding(image: Path) -> Iterator[None]:
    """An interactive qemu-io holding QEMU's write lock on image until the block ends."""
    proc = subprocess.Popen(
        [qemu_io.binary(), "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # Once qemu-io has answered a command, it has opened the image and taken its locks.
        proc.stdin.write(b"read 0 512\n")
        proc.stdin.flush()
        output = b""
        deadline = time.monotonic() + 10
        while b"read 512/512" not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"qemu-io did not answer: {output!r}"
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            chunk = proc.stdout.read1(4096) if ready else b""
            assert chunk or not ready, f"qemu-io exited: {proc.communicate()[1]!r}"
            output += chunk
        yield
    finally:
        proc.kill()
        proc.communicate(timeout=10)


# create / info


def test_create_qcow2_with_options(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    qemu_img.create(image, size=SIZE, options={"cluster_size": 4096, "lazy_refcounts": True})
    info = qemu_img.info(image)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["lazy-refcounts"] is True


def test_create_raw_with_size_string(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    qemu_img.create(image, "raw", "3M")
    assert qemu_img.info(image)["virtual-size"] == 3 * MiB
    assert image.stat().st_size == 3 * MiB


def test_create_option_value_with_comma_is_escaped(tmp_path: Path) -> None:
    base = tmp_path / "a,b.qcow2"
    qemu_img.create(base, size=SIZE)
    top = tmp_path / "top.qcow2"
    qemu_img.create(top, options={"backing_file": base.name, "backing_fmt": "qcow2"})
    assert qemu_img.info(top)["backing-filename"] == "a,b.qcow2"


def test_create_backing_detects_format_and_size(chain: list[Path]) -> None:
    base, mid, top = chain
    mid_info = qemu_img.info(mid)
    assert mid_info["backing-filename"] == "base.raw"  # stored relative, as given
    assert mid_info["backing-filename-format"] == "raw"
    assert mid_info["virtual-size"] == SIZE
    assert qemu_img.info(top)["backing-filename-format"] == "qcow2"


def test_info_backing_chain_top_first(chain: list[Path]) -> None:
    infos = qemu_img.info(chain[2], backing_chain=True)
    assert [Path(i["filename"]).name for i in infos] == ["top.qcow2", "mid.qcow2", "base.raw"]
    assert [i["format"] for i in infos] == ["qcow2", "qcow2", "raw"]


def test_info_missing_image_raises_with_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    with pytest.raises(errors.QemuImgError) as excinfo:
        qemu_img.info(missing)
    e = excinfo.value
    assert e.returncode == 1
    assert "No such file" in e.stderr
    assert e.cmd[0] == qemu_img.binary() and e.cmd[1:3] == ["info", "--output=json"]
    assert str(missing) in str(e) and "\n" not in str(e)


def test_info_force_share_reads_a_locked_image(written_qcow2: Path) -> None:
    with qemu_io_holding(written_qcow2):
        with pytest.raises(errors.QemuImgError) as excinfo:
            qemu_img.info(written_qcow2)
        assert "lock" in excinfo.value.stderr
        assert qemu_img.info(written_qcow2, force_share=True)["virtual-size"] == SIZE


# check


def test_check_clean_image(written_qcow2: Path) -> None:
    result = qemu_img.check(written_qcow2)
    assert result["corruptions"] == 0 and result["leaks"] == 0
    assert result["check-errors"] == 0
    assert qemu_img.check_clean(written_qcow2, allow_leaks=False) == result


def test_check_reports_leaks(written_qcow2: Path) -> None:
    set_l2_entry(written_qcow2, 0)  # the data cluster is still counted, no longer used
    result = qemu_img.check(written_qcow2)
    assert result["leaks"] == 1 and result["corruptions"] == 0
    assert qemu_img.check_clean(written_qcow2)["leaks"] == 1  # leaks allowed by default
    with pytest.raises(errors.ImageCorrupted) as excinfo:
        qemu_img.check_clean(written_qcow2, allow_leaks=False)
    assert excinfo.value.leaks == 1 and excinfo.value.returncode == 3
    repaired = qemu_img.check(written_qcow2, repair="leaks")
    assert repaired["leaks-fixed"] == 1
    assert qemu_img.check(written_qcow2)["leaks"] == 0


def test_check_reports_corruption(written_qcow2: Path) -> None:
    # Point guest cluster 0 at its own L2 table: a cluster referenced twice, counted once.
    l2_offset = l2_entry_offset(written_qcow2) & ~0xFFFF
    set_l2_entry(written_qcow2, QCOW_OFLAG_COPIED | l2_offset)
    result = qemu_img.check(written_qcow2)
    assert result["corruptions"] >= 1
    with pytest.raises(errors.ImageCorrupted) as excinfo:
        qemu_img.check_clean(written_qcow2)
    e = excinfo.value
    assert isinstance(e, errors.QemuImgError)
    assert e.corruptions == result["corruptions"] and e.returncode == 2
    assert e.path == str(written_qcow2) and str(written_qcow2) in str(e)
    assert e.result == result


def test_check_raw_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    qemu_img.create(image, "raw", SIZE)
    with pytest.raises(errors.QemuImgError) as excinfo:
        qemu_img.check(image)
    assert excinfo.value.returncode == 63
    assert "does not support checks" in excinfo.value.stderr


# compare


def test_compare_chain_with_independent_raw(chain: list[Path], tmp_path: Path) -> None:
    expected = expected_chain_raw(tmp_path / "expected.raw")
    assert qemu_img.compare(chain[2], expected, fmt_a="qcow2", fmt_b="raw") is None


def test_compare_mismatch(chain: list[Path], tmp_path: Path) -> None:
    expected = expected_chain_raw(tmp_path / "expected.raw")
    qemu_io.run(expected, "write -P 0x44 3M 512", fmt="raw")
    with pytest.raises(errors.ContentMismatch) as excinfo:
        qemu_img.compare(chain[2], expected)
    e = excinfo.value
    assert isinstance(e, errors.QemuImgError)
    assert e.returncode == 1
    assert f"offset {3 * MiB}" in e.output
    assert f"offset {3 * MiB}" in str(e) and "\n" not in str(e)


def test_compare_strict_fails_on_size(tmp_path: Path) -> None:
    small, large = tmp_path / "small.raw", tmp_path / "large.raw"
    qemu_img.create(small, "raw", MiB)
    qemu_img.create(large, "raw", 2 * MiB)
    qemu_img.compare(small, large)  # the excess of the larger image reads as zeros
    with pytest.raises(errors.ContentMismatch, match="size mismatch"):
        qemu_img.compare(small, large, strict=True)


def test_compare_missing_image_is_not_a_mismatch(written_qcow2: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.QemuImgError) as excinfo:
        qemu_img.compare(written_qcow2, tmp_path / "missing.qcow2")
    assert not isinstance(excinfo.value, errors.ContentMismatch)
    assert excinfo.value.returncode == 2
    assert "missing.qcow2" in excinfo.value.stderr


# convert / commit / rebase / map


def test_convert_chain_to_raw_and_compressed_qcow2(chain: list[Path], tmp_path: Path) -> None:
    raw = tmp_path / "flat.raw"
    qemu_img.convert(chain[2], raw)
    assert qemu_img.info(raw)["format"] == "raw"
    qemu_io.run(raw, "read -P 0x11 0 1M", "read -P 0x33 1536k 64k", fmt="raw")
    packed = tmp_path / "packed.qcow2"
    qemu_img.convert(
        raw, packed, "qcow2", src_fmt="raw", options={"compat": "1.1"}, compressed=True
    )
    assert "backing-filename" not in qemu_img.info(packed)
    qemu_img.compare(packed, expected_chain_raw(tmp_path / "expected.raw"))


def test_commit_top_into_mid(chain: list[Path], tmp_path: Path) -> None:
    _, mid, top = chain
    qemu_img.commit(top)
    qemu_img.compare(mid, expected_chain_raw(tmp_path / "expected.raw"))
    qemu_img.check_clean(mid, allow_leaks=False)


def test_rebase_unsafe_renames_backing(chain: list[Path]) -> None:
    _, mid, top = chain
    renamed = mid.with_name("renamed.qcow2")
    os.rename(mid, renamed)
    qemu_img.rebase(top, "renamed.qcow2", unsafe=True)
    info = qemu_img.info(top)
    assert info["backing-filename"] == "renamed.qcow2"
    assert info["backing-filename-format"] == "qcow2"  # detected


def test_rebase_safe_onto_nothing_keeps_contents(chain: list[Path], tmp_path: Path) -> None:
    top = chain[2]
    qemu_img.rebase(top, "")
    assert "backing-filename" not in qemu_img.info(top)
    qemu_img.compare(top, expected_chain_raw(tmp_path / "expected.raw"))


def test_map_reports_depth_of_data(chain: list[Path]) -> None:
    extents = qemu_img.map(chain[2])
    assert sum(e["length"] for e in extents) == SIZE
    by_start = {e["start"]: e for e in extents}
    assert by_start[1536 * KiB]["depth"] == 0 and by_start[1536 * KiB]["data"]
    assert by_start[0]["depth"] == 2 and by_start[0]["data"]


# plumbing: JSON, environment, logging


def fake_binary(tmp_path: Path, name: str, script: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_json_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_binary(tmp_path, "qemu-img", "echo 'this is not json'")
    monkeypatch.setenv("QEMU_IMG", str(fake))
    with pytest.raises(errors.QemuImgError, match="expected JSON") as excinfo:
        qemu_img.info(tmp_path / "any.qcow2")
    assert excinfo.value.output.strip() == "this is not json"


def test_binary_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls"
    real = subprocess.run(["sh", "-c", "command -v qemu-img"], capture_output=True, text=True)
    fake = fake_binary(
        tmp_path, "qemu-img", f'echo "$@" >> {calls}\nexec {real.stdout.strip()} "$@"'
    )
    monkeypatch.setenv("QEMU_IMG", str(fake))
    image = tmp_path / "a.qcow2"
    qemu_img.create(image, size=MiB)
    assert qemu_img.info(image)["virtual-size"] == MiB
    assert calls.read_text().splitlines() == [
        f"create -q -f qcow2 {image} {MiB}",
        f"info --output=json {image}",
    ]


def test_missing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(errors.QemuImgError, match="cannot run") as excinfo:
        qemu_img.create(tmp_path / "a.qcow2", size=MiB)
    assert excinfo.value.returncode is None


def test_commands_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vdisk")
    image = tmp_path / "a.qcow2"
    qemu_img.create(image, size=MiB)
    with pytest.raises(errors.QemuImgError):
        qemu_img.info(tmp_path / "missing.qcow2")
    running = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert f"Running qemu-img create -q -f qcow2 {image} {MiB}" in running
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 1 and "No such file" in failures[0]


# qemu_io


def test_qemu_io_pattern_verification_failure(written_qcow2: Path) -> None:
    assert "read 65536/65536 bytes at offset 0" in qemu_io.run(written_qcow2, "read -P 0x5a 0 64k")
    with pytest.raises(errors.QemuIoError) as excinfo:
        qemu_io.run(written_qcow2, "read -P 0x5a 0 64k", "read -P 0x00 0 4k")
    e = excinfo.value
    assert e.returncode == 1
    assert "Pattern verification failed at offset 0" in e.output
    assert "Pattern verification failed" in str(e)


def test_qemu_io_force_share_reads_locked_image(written_qcow2: Path) -> None:
    with qemu_io_holding(written_qcow2):
        with pytest.raises(errors.QemuIoError) as excinfo:
            qemu_io.run(written_qcow2, "read -P 0x5a 0 64k", readonly=True)
        assert "lock" in excinfo.value.stderr
        qemu_io.run(written_qcow2, "read -P 0x5a 0 64k", force_share=True)


def test_qemu_io_needs_a_command(written_qcow2: Path) -> None:
    with pytest.raises(ValueError):
        qemu_io.run(written_qcow2)
