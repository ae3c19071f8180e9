"""vdisk.lab.guest: the workload configuration the host hands the test guest, and its
markers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vdisk.lab import guest


def test_config_text_one_line_per_value() -> None:
    text = guest.config_text(
        "nbdclient", nbd_client_arg=["nbd-client", "-N", "", "10.0.2.2", "10809"], pattern="0x5a"
    )
    assert text == (
        "workload=nbdclient\n"
        "nbd_client_arg=nbd-client\nnbd_client_arg=-N\nnbd_client_arg=\n"
        "nbd_client_arg=10.0.2.2\nnbd_client_arg=10809\n"
        "pattern=0x5a\n"
    )


def test_config_text_numbers() -> None:
    assert guest.config_text("writer", seconds=3, length=65536) == (
        "workload=writer\nseconds=3\nlength=65536\n"
    )


@pytest.mark.parametrize(
    ("workload", "params"),
    [
        ("reboot", {}),
        ("writer", {"Bad-Key": "1"}),
        ("writer", {"run": "a\nworkload=selftest"}),
    ],
)
def test_config_text_rejects(workload: str, params: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        guest.config_text(workload, **params)


def test_marker_fields_and_pattern() -> None:
    line = "VDISK-SELFTEST: wrote pattern=0xa5 offset=67108864 length=1048576 sha256=16c7"
    match = re.match(guest.marker_pattern("selftest", "wrote (.*)"), line)
    assert match is not None
    assert guest.marker_fields(match.group(1)) == {
        "pattern": "0xa5", "offset": "67108864", "length": "1048576", "sha256": "16c7",
    }  # fmt: skip


def test_default_outdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VDISK_GUEST_DIR", str(tmp_path / "g"))
    assert guest.default_outdir() == tmp_path / "g"
    monkeypatch.delenv("VDISK_GUEST_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert guest.default_outdir() == tmp_path / "cache" / "vdisk" / "guest"
