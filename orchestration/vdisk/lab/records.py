"""Verify what the guest's ``writer`` workload wrote.

The writer (vm-images/init) fills a region of its disk with 4 KiB records,
each written with O_DIRECT and flushed before the next, and ends with a
summary line on the console::

    VDISK-WRITER: DONE run=5e2d296af1ce40e4 records=101 offset=67108864
        length=201326592 slots=49152 stride=40009 record_size=4096 ...

Record ``seq`` (1, 2, ...) lives in slot ``(seq * stride) % slots`` of the
region, so consecutive records land far apart; once ``seq`` passes ``slots``
they overwrite older ones and a slot holds the last record mapped to it::

    slot:   0     1     2    ...   s=(seq*stride)%slots   ...  slots-1
          [rec] [   ] [rec]  ...   [VDISKREC 1 run=R seq=S slot=s sha256=H|body]

    record [0, 256)     b"VDISKREC 1 run=R seq=S slot=s sha256=H", space padded, b"\\n"
           [256, 320)   b"run=R seq=S", space padded, b"\\n"
           [320, 4096)  random bytes
    H = sha256 of [256, 4096)

:func:`verify` checks that every slot holds exactly the record the summary
implies (run, sequence number, slot, checksum, body text) and that no slot
holds a record of this run it should not.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import qemu_img
from ..errors import Error

RECORD_SIZE = 4096
HEADER_SIZE = 256
BODY_TEXT_SIZE = 64
MAGIC = b"VDISKREC 1 "

_HEADER = re.compile(
    rb"^VDISKREC 1 run=([0-9a-f]+) seq=(\d+) slot=(\d+) sha256=([0-9a-f]{64}) *\n$"
)
_SUMMARY_FIELDS = ("run", "records", "offset", "length", "slots", "stride", "record_size")

Reader = Callable[[int, int], bytes]  # read(offset, length) -> bytes of the disk


class RecordsInvalid(Error):
    """The region does not hold what the writer's summary says it wrote."""

    msg = "{self.count} bad slots in run {self.run}; first: {self.first}"

    def __init__(self, run: str, problems: list[str]) -> None:
        super().__init__(run, problems)
        self.run = run
        self.problems = problems
        self.count = len(problems)
        self.first = "; ".join(problems[:5])


class BadSummary(Error):
    msg = "not a writer summary: {self.reason}"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class WriterSummary:
    run: str
    records: int
    offset: int
    length: int
    slots: int
    stride: int
    record_size: int = RECORD_SIZE

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> WriterSummary:
        """From the ``key=value`` words of the ``VDISK-WRITER: DONE`` line."""
        missing = [k for k in _SUMMARY_FIELDS if k not in fields]
        if missing:
            raise BadSummary(f"missing {', '.join(missing)} in {fields}")
        try:
            summary = cls(run=fields["run"], **{k: int(fields[k]) for k in _SUMMARY_FIELDS[1:]})
        except ValueError as e:
            raise BadSummary(f"{e} in {fields}") from e
        if summary.record_size != RECORD_SIZE or summary.slots * RECORD_SIZE != summary.length:
            raise BadSummary(f"inconsistent sizes in {fields}")
        return summary

    def slot_of(self, seq: int) -> int:
        return (seq * self.stride) % self.slots

    def expected(self) -> dict[int, int]:
        """slot -> the last sequence number written there."""
        last: dict[int, int] = {}
        for seq in range(1, self.records + 1):
            last[self.slot_of(seq)] = seq
        return last


@dataclass
class Report:
    run: str
    records_written: int
    slots_checked: int = 0
    records_found: int = 0
    problems: list[str] = field(default_factory=list)


def make_record(run: str, seq: int, slot: int, payload: bytes) -> bytes:
    """A record as the guest writes it (``payload`` is the random part, 3776 bytes)."""
    text = f"run={run} seq={seq}".encode()
    body = text.ljust(BODY_TEXT_SIZE - 1) + b"\n" + payload
    if len(body) != RECORD_SIZE - HEADER_SIZE:
        raise ValueError(f"payload must be {RECORD_SIZE - HEADER_SIZE - BODY_TEXT_SIZE} bytes")
    digest = hashlib.sha256(body).hexdigest()
    header = f"VDISKREC 1 run={run} seq={seq} slot={slot} sha256={digest}".encode()
    return header.ljust(HEADER_SIZE - 1) + b"\n" + body


def check_slot(summary: WriterSummary, slot: int, data: bytes, want: int | None) -> str | None:
    """What is wrong with one slot's 4 KiB, or None. ``want``: the expected seq, or None."""
    if not data.startswith(MAGIC):
        return None if want is None else f"slot {slot}: record {want} missing"
    match = _HEADER.match(data[:HEADER_SIZE])
    if match is None:
        return f"slot {slot}: malformed record header {data[:80]!r}"
    run, seq_text, slot_text, digest = (g.decode() for g in match.groups())
    if run != summary.run:
        return None if want is None else f"slot {slot}: record of run {run}, not {summary.run}"
    seq = int(seq_text)
    body = data[HEADER_SIZE:]
    if hashlib.sha256(body).hexdigest() != digest:
        return f"slot {slot}: record {seq} fails its checksum"
    if int(slot_text) != slot:
        return f"slot {slot}: record {seq} says slot {slot_text}"
    if body[:BODY_TEXT_SIZE] != f"run={run} seq={seq}".encode().ljust(BODY_TEXT_SIZE - 1) + b"\n":
        return f"slot {slot}: record {seq} has a body of another record"
    if want is None:
        return f"slot {slot}: record {seq} should not be here"
    if seq != want:
        return f"slot {slot}: record {seq}, expected {want}"
    return None


def iter_slots(
    read: Reader, summary: WriterSummary, chunk: int = 256
) -> Iterator[tuple[int, bytes]]:
    """(slot, 4 KiB) for every slot of the region, read ``chunk`` slots at a time."""
    for first in range(0, summary.slots, chunk):
        n = min(chunk, summary.slots - first)
        data = read(summary.offset + first * RECORD_SIZE, n * RECORD_SIZE)
        if len(data) != n * RECORD_SIZE:
            raise ValueError(f"short read at slot {first}: {len(data)} bytes")
        for i in range(n):
            yield first + i, data[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]


def verify(read: Reader, summary: WriterSummary) -> Report:
    """Check the whole region against the summary; raise RecordsInvalid on any problem."""
    expected = summary.expected()
    report = Report(summary.run, summary.records)
    for slot, data in iter_slots(read, summary):
        report.slots_checked += 1
        want = expected.get(slot)
        problem = check_slot(summary, slot, data, want)
        if problem:
            report.problems.append(problem)
        elif want is not None:
            report.records_found += 1
    if report.records_found != len(expected) and not report.problems:
        report.problems.append(f"found {report.records_found} records, expected {len(expected)}")
    if report.problems:
        raise RecordsInvalid(summary.run, report.problems)
    return report


def verify_image(
    image: str | os.PathLike[str], summary: WriterSummary, *, fmt: str | None = None
) -> Report:
    """Verify the records in a disk image (any format qemu-img reads, whole chain).

    QEMU, not vdisk, reads the image: ``qemu-img convert`` copies the region
    out (a raw node with offset and size over the image) into a temporary
    sparse raw file.
    """
    if fmt is None:
        fmt = qemu_img.info(image, force_share=True)["format"]
    path = os.fspath(Path(image).absolute()).replace(",", ",,")
    region = (
        f"driver=raw,offset={summary.offset},size={summary.length},"
        f"file.driver={fmt},file.file.driver=file,file.file.filename={path}"
    )
    with tempfile.TemporaryDirectory(prefix="vdisk-records-") as tmp:
        raw = Path(tmp) / "region.raw"
        qemu_img.run(["convert", "-U", "-O", "raw", "--image-opts", region, raw])
        with open(raw, "rb") as f:

            def read(offset: int, length: int) -> bytes:
                f.seek(offset - summary.offset)
                return f.read(length)

            return verify(read, summary)
