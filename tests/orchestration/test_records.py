"""vdisk.lab.records: the verifier of the guest writer's records, on regions built here.

Regions are made with :func:`records.make_record`, the same layout the guest's
shell code writes (the boot tests verify real guest output). Each corruption
a lost, torn, stale or misplaced write would cause must be reported.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vdisk import qemu_img
from vdisk.lab import records
from vdisk.lab.guest import marker_fields

RUN = "0123456789abcdef"
PAYLOAD = records.RECORD_SIZE - records.HEADER_SIZE - records.BODY_TEXT_SIZE
OFFSET = 64 * 1024 * 1024


def summary(n: int, slots: int = 16, stride: int = 5) -> records.WriterSummary:
    return records.WriterSummary(RUN, n, OFFSET, slots * 4096, slots, stride)


def region_for(s: records.WriterSummary, seed: int = 1) -> bytearray:
    """The region after the writer wrote records 1..s.records in order."""
    rng = random.Random(seed)
    region = bytearray(s.length)
    for seq in range(1, s.records + 1):
        slot = s.slot_of(seq)
        record = records.make_record(s.run, seq, slot, rng.randbytes(PAYLOAD))
        region[slot * 4096 : (slot + 1) * 4096] = record
    return region


def reader(region: bytearray) -> records.Reader:
    def read(offset: int, length: int) -> bytes:
        start = offset - OFFSET
        return bytes(region[start : start + length])

    return read


def problems(s: records.WriterSummary, region: bytearray) -> list[str]:
    with pytest.raises(records.RecordsInvalid) as e:
        records.verify(reader(region), s)
    return e.value.problems


def test_summary_from_console_line() -> None:
    line = (
        "DONE run=5e2d296af1ce40e4 records=101 offset=67108864 length=201326592 slots=49152 "
        "stride=40009 record_size=4096 elapsed_cs=633 stopped_by=stop"
    )
    s = records.WriterSummary.from_fields(marker_fields(line))
    assert s == records.WriterSummary("5e2d296af1ce40e4", 101, 67108864, 201326592, 49152, 40009)


@pytest.mark.parametrize(
    "change",
    [{"records": None}, {"records": "x"}, {"slots": "15"}, {"record_size": "512"}],
)
def test_bad_summary_is_rejected(change: dict[str, str | None]) -> None:
    fields = {"run": RUN, "records": "3", "offset": "0", "length": "65536", "slots": "16"}
    fields |= {"stride": "5", "record_size": "4096"}
    for key, value in change.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    with pytest.raises(records.BadSummary):
        records.WriterSummary.from_fields(fields)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100])
def test_intact_region_verifies(n: int) -> None:
    s = summary(n)
    report = records.verify(reader(region_for(s)), s)
    assert report.slots_checked == 16
    assert report.records_found == min(n, 16)
    assert report.problems == []


def test_expected_keeps_the_last_record_of_each_slot() -> None:
    s = summary(20)
    expected = s.expected()
    assert s.slot_of(4) == s.slot_of(20)  # 16 slots: seq and seq + 16 share a slot
    assert expected == {s.slot_of(seq): seq for seq in range(5, 21)}


def test_flipped_byte_fails_the_checksum() -> None:
    s = summary(10)
    region = region_for(s)
    slot = s.slot_of(7)
    region[slot * 4096 + 3000] ^= 0x01
    assert problems(s, region) == [f"slot {slot}: record 7 fails its checksum"]


def test_lost_record_is_missing() -> None:
    s = summary(10)
    region = region_for(s)
    slot = s.slot_of(10)
    region[slot * 4096 : (slot + 1) * 4096] = bytes(4096)
    assert problems(s, region) == [f"slot {slot}: record 10 missing"]


def test_lost_overwrite_leaves_a_stale_record() -> None:
    s = summary(20)
    region = region_for(s)
    stale = region_for(summary(18))  # the write of record 20 never landed
    slot = s.slot_of(20)
    region[slot * 4096 : (slot + 1) * 4096] = stale[slot * 4096 : (slot + 1) * 4096]
    assert problems(s, region) == [f"slot {slot}: record 4, expected 20"]


def test_record_beyond_the_summary_is_reported() -> None:
    s = summary(10)
    region = region_for(summary(11))  # the guest wrote more than it reported
    assert problems(s, region) == [f"slot {s.slot_of(11)}: record 11 should not be here"]


def test_misplaced_record_is_reported() -> None:
    s = summary(3, slots=16)
    region = region_for(s)
    a, b = s.slot_of(1), s.slot_of(2)
    region[a * 4096 : (a + 1) * 4096], region[b * 4096 : (b + 1) * 4096] = (
        region[b * 4096 : (b + 1) * 4096],
        region[a * 4096 : (a + 1) * 4096],
    )
    assert problems(s, region) == [
        f"slot {a}: record 2 says slot {b}",
        f"slot {b}: record 1 says slot {a}",
    ]


def test_torn_record_is_reported() -> None:
    s = summary(5)
    region = region_for(s)
    other = region_for(s, seed=2)  # same records, other random payloads
    slot = s.slot_of(3)
    region[slot * 4096 + 2048 : (slot + 1) * 4096] = other[slot * 4096 + 2048 : (slot + 1) * 4096]
    assert problems(s, region) == [f"slot {slot}: record 3 fails its checksum"]


def test_records_of_another_run_do_not_count() -> None:
    s = summary(4)
    old = records.WriterSummary("feedfacefeedface", 16, OFFSET, 16 * 4096, 16, 5)
    region = region_for(old)  # an earlier run filled every slot
    assert len(problems(s, region)) == 4
    for seq in range(1, 5):  # the records of this run replace four of them
        slot = s.slot_of(seq)
        region[slot * 4096 : (slot + 1) * 4096] = region_for(s)[slot * 4096 : (slot + 1) * 4096]
    assert records.verify(reader(region), s).records_found == 4


def test_verify_image_reads_through_qemu(tmp_path: Path) -> None:
    s = summary(40)
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(OFFSET + s.length + 1024 * 1024)
        f.seek(OFFSET)
        f.write(region_for(s))
    image = tmp_path / "disk.qcow2"
    qemu_img.convert(raw, image, "qcow2", src_fmt="raw")
    assert records.verify_image(image, s).records_found == 16
    with pytest.raises(records.RecordsInvalid):
        records.verify_image(image, summary(41))
