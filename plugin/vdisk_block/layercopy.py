"""Copy one qcow2 layer into a new, compact qcow2 v3 file.

The copy step of replicating a chain to another datastore: only the layer's
own clusters move (not the chain view), and the copy keeps the layer's content
identity, so a chain rebuilt from copies checks as the original did.

Source L2 entry (inside the virtual size)    entry in the copy
    0 (or only COPIED)                       0, unallocated
    ZERO_FLAG, with or without a host offset 1, zero with no allocation
    normal data cluster                      COPIED | new offset, data copied
    COMPRESSED                               COPIED | new offset, data inflated

Layout of the copy (n clusters of the source's cluster size cs)::

    | 0      | L1 table | refcount | refcount | L2 tables   | data clusters        |
    | header |          | table    | blocks   | (used only) | (in source order)    |

Every cluster has refcount 1 (16-bit refcounts); the refcount blocks cover the
whole file, themselves and the table included (a fixpoint). Data clusters keep
the order they have in the source file, so the copy is a few long sequential
runs. The source is read through the page cache with a large readahead; the
data is written with direct I/O (O_DIRECT, from aligned buffers) so that a
copy of gigabytes neither evicts the host's page cache nor waits for fresh
page-cache memory, and its final fsync has only metadata left. Where direct
I/O is refused (the filesystem, or clusters smaller than DIRECT_ALIGN) the
data moves with copy_file_range (pread/pwrite where the kernel cannot), its
writeback started as each chunk lands. The metadata is always written
through the page cache, before the data region.

The file is created with O_EXCL under the caller's (temporary) name and fsynced;
renaming it into place and syncing the directory are the caller's. On any
error, or an exception raised by the progress callback (a cancellation), the
partial file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from . import create
from . import header as hdr
from .errors import RequestError
from .image import COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG, Qcow2File

CHUNK = 8 << 20             # largest single copy_file_range / pread / pwrite
DIRECT_CHUNK = 2 << 20      # one direct-I/O buffer (touched afresh by every process)
DIRECT_WORKERS = 2          # chunks in flight: one is read while another is written
READ_AHEAD = 16 << 20       # direct path: source bytes asked for ahead of the chunk in hand
DIRECT_ALIGN = 4096         # offsets and lengths of direct writes: any logical block size
_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                              errno.ENOTSUP})
_REFCOUNT_ONE = (1).to_bytes(2, "big")          # refcount order 4: 16-bit big-endian

Progress = Callable[[int], None]


@dataclass
class CopyResult:
    bytes_moved: int        # bytes written to the new file (metadata + data)
    data_bytes: int         # bytes of guest data clusters written
    clusters: int           # data clusters written
    zero_clusters: int      # zero-flag entries kept
    fd: int | None = None   # with sync=False: the copy, still open, for the caller's fsync


@dataclass
class _Scan:
    """The used L2 tables of a layer, validated, and what they hold."""

    tables: list[tuple[int, array]]     # (L1 index, source L2 entries inside the disk)
    data_clusters: int
    zero_clusters: int


@dataclass
class _Layout:
    """Where each structure of the copy goes, in clusters."""

    l1_entries: int
    l1_clusters: int
    table_start: int
    table_clusters: int
    blocks_start: int
    blocks: int
    l2_start: int
    data_start: int
    total: int


def plan_bytes(src_path: str) -> int:
    """Bytes of guest data copy_layer(src_path, ...) would move (a progress total)."""
    f = Qcow2File(src_path, writable=False)
    try:
        return _scan(f).data_clusters * f.cluster_size
    finally:
        f.close()


def copy_layer(src_path: str, dst_path: str, *, backing: str | None,
               backing_format: str | None, progress: Progress | None = None,
               sync: bool = True, direct: bool = True) -> CopyResult:
    """Copy the layer src_path into a new file dst_path (which must not exist).

    ``backing``/``backing_format`` are written in the copy's header as given.
    ``progress(n)`` is called with the guest data bytes moved after each chunk;
    their total is plan_bytes(src_path). With ``sync=False`` the copy is left
    for the caller to fsync (its data already written directly, or its
    writeback under way) through
    ``CopyResult.fd``, which the caller closes: fsyncing the descriptor that
    wrote the data is what reports a writeback error. ``direct=False`` writes the
    data through the page cache too.
    """
    f = Qcow2File(src_path, writable=False)
    try:
        scan = _scan(f)
        cs = f.cluster_size
        layout = _layout(dst_path, f.size, cs, len(scan.tables), scan.data_clusters)
        ident = f.identity
        first = create.header_cluster(
            dst_path, cs, f.size, l1_entries=layout.l1_entries, l1_offset=cs,
            refcount_table_offset=layout.table_start * cs,
            refcount_table_clusters=layout.table_clusters, backing=backing,
            backing_format=backing_format,
            content_id=ident.content_id if ident.valid else None,
            parent_id=ident.parent_id if ident.valid else None)
        fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_copy(f, fd, direct, scan, layout, first, progress)
            if sync:
                os.fsync(fd)
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst_path)
            raise
    finally:
        f.close()
    data_bytes = scan.data_clusters * cs
    return CopyResult(bytes_moved=layout.total * cs, data_bytes=data_bytes,
                      clusters=scan.data_clusters, zero_clusters=scan.zero_clusters,
                      fd=None if sync else fd)


# -- planning ---------------------------------------------------------------------------


def _scan(f: Qcow2File) -> _Scan:
    """Read and validate every L2 entry inside the virtual size; count what moves.

    Entries past the virtual size (in the last L2 table, or L1 entries beyond
    the ones the size needs) are never read by a guest and are not copied.
    """
    cs = f.cluster_size
    span = cs // 8
    guest_clusters = -(-f.size // cs)
    check = f.check_l2_entry
    tables: list[tuple[int, array]] = []
    data = zero = 0
    for i, _off, l2 in f.l2_tables():
        first = i * span
        if first >= guest_clusters:
            break
        if first + span > guest_clusters:
            l2 = l2[:guest_clusters - first]
        if not any(l2):
            continue
        used = False
        for k, e in enumerate(l2):
            if not e:
                continue
            check(e, (first + k) * cs)
            if e & COMPRESSED or (e & OFFSET_MASK and not e & ZERO_FLAG):
                data += 1
                used = True
            elif e & ZERO_FLAG:
                zero += 1
                used = True
        if used:
            tables.append((i, l2))
    return _Scan(tables, data, zero)


def _layout(path: str, size: int, cs: int, l2_tables: int, data_clusters: int) -> _Layout:
    """Place the structures; size the refcount blocks and table to cover them all."""
    l1_entries = create.l1_entries_for(size, cs)
    l1_clusters = -(-l1_entries * 8 // cs)
    per_block = cs * 8 // (1 << create.REFCOUNT_ORDER)
    fixed = 1 + l1_clusters + l2_tables + data_clusters
    blocks = table_clusters = 1
    while True:
        total = fixed + table_clusters + blocks
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    if table_clusters * cs > hdr.MAX_REFTABLE_BYTES:
        raise RequestError(path, f"a copy of {total} clusters of {cs} bytes needs a refcount "
                           "table larger than QEMU accepts")
    table_start = 1 + l1_clusters
    blocks_start = table_start + table_clusters
    l2_start = blocks_start + blocks
    return _Layout(l1_entries, l1_clusters, table_start, table_clusters, blocks_start, blocks,
                   l2_start, l2_start + l2_tables, total)


# -- writing ----------------------------------------------------------------------------


def _write_copy(f: Qcow2File, fd: int, direct: bool, scan: _Scan, layout: _Layout,
                first: bytes, progress: Progress | None) -> None:
    """Data first (with direct I/O where possible), then the metadata, which lies
    before the data region in other clusters."""
    cs = f.cluster_size
    l2_bytes, copies, inflates = _map_clusters(scan, layout, cs)
    with _DataMover(f.fd, fd, direct and cs % DIRECT_ALIGN == 0, progress) as mover:
        for src, dst, length in copies:         # in the source's order
            mover.copy(src, dst, length)
        for dst, entries in inflates:
            mover.write(b"".join(f.read_compressed(e) for e in entries), dst)
    _pwrite_all(fd, first + _fixed_metadata(scan, layout, cs), 0)
    l2_view = memoryview(l2_bytes)
    for start in range(0, len(l2_view), CHUNK):
        _pwrite_all(fd, l2_view[start:start + CHUNK], layout.l2_start * cs + start)
    os.ftruncate(fd, layout.total * cs)


def _map_clusters(scan: _Scan, layout: _Layout, cs: int
                  ) -> tuple[bytearray, list[tuple[int, int, int]], list[tuple[int, list[int]]]]:
    """The copy's L2 tables (big-endian, back to back) and the data to move.

    Data clusters are laid out in the order of their source host offsets, so a
    layer written at random guest offsets still copies as a few long runs
    (whole in the source and the copy); inflated compressed clusters follow,
    in guest order::

        guest   0    1    2  3    4  5
        source  a+2  a    .  a+1  z  c      (. unallocated, z compressed)
        copy    d+2  d    .  d+1  d+4 d+3   copies (a, d, 3), (c, d+3, 1)
                                             inflates (d+4, [z])

    Returns the L2 bytes, the copy runs (source offset, target offset,
    length) and the compressed groups (target offset, entries).
    """
    span = cs // 8
    tables = [array("Q", bytes(8 * span)) for _ in scan.tables]
    data: list[tuple[int, int, int]] = []           # (source host offset, table, index)
    compressed: list[tuple[int, int, int]] = []     # (entry, table, index), guest order
    for t, (_i, l2) in enumerate(scan.tables):
        new = tables[t]
        for k, e in enumerate(l2):
            if not e:
                continue
            if e & COMPRESSED:
                compressed.append((e, t, k))
            elif e & ZERO_FLAG:
                new[k] = ZERO_FLAG
            elif e & OFFSET_MASK:
                data.append((e & OFFSET_MASK, t, k))
    data.sort()
    dst = layout.data_start * cs
    copies: list[tuple[int, int, int]] = []
    for host, t, k in data:
        if copies and copies[-1][0] + copies[-1][2] == host:
            copies[-1] = (copies[-1][0], copies[-1][1], copies[-1][2] + cs)
        else:
            copies.append((host, dst, cs))
        tables[t][k] = COPIED | dst
        dst += cs
    inflates: list[tuple[int, list[int]]] = []
    per_group = max(1, DIRECT_CHUNK // cs)
    for e, t, k in compressed:
        if not inflates or len(inflates[-1][1]) >= per_group:
            inflates.append((dst, []))
        inflates[-1][1].append(e)
        tables[t][k] = COPIED | dst
        dst += cs
    out = bytearray()
    for new in tables:
        new.byteswap()
        out += new.tobytes()
    return out, copies, inflates


def _fixed_metadata(scan: _Scan, layout: _Layout, cs: int) -> bytes:
    """L1 table, refcount table and refcount blocks: clusters 1 .. l2_start - 1."""
    l1 = array("Q", bytes(layout.l1_clusters * cs))
    for n, (i, _l2) in enumerate(scan.tables):
        l1[i] = COPIED | (layout.l2_start + n) * cs
    table = array("Q", bytes(layout.table_clusters * cs))
    for b in range(layout.blocks):
        table[b] = (layout.blocks_start + b) * cs
    l1.byteswap()
    table.byteswap()
    counts = _REFCOUNT_ONE * layout.total
    return b"".join((l1.tobytes(), table.tobytes(), counts,
                     bytes(layout.blocks * cs - len(counts))))


class _DataMover:
    """Moves bytes from the source to the copy, reporting progress per chunk.

    With ``direct`` the copy's descriptor is switched to O_DIRECT for the data
    (and back before the metadata is written): no second open, which would
    check the file's permissions again. Chunks are read and written by
    DIRECT_WORKERS threads, each with its own page-aligned buffer, so that one
    reads while another writes (the GIL is released in both calls). Every
    write starts at a cluster boundary and is padded with zeros to
    DIRECT_ALIGN (only a source cut short inside its last cluster needs it:
    the padding reads as zeros, as the missing bytes did). The first chunk is
    moved in the calling thread: if the switch or that first write is refused,
    the mover falls back to the page-cache path for good; a refusal after that
    is an error. The mover returns only once no worker writes any more, even
    when interrupted.
    """

    def __init__(self, src: int, dst: int, direct: bool, progress: Progress | None) -> None:
        self.src = src
        self.dst = dst
        self.progress = progress
        self.use_copy_file_range = hasattr(os, "copy_file_range")
        self.direct = False
        self.proven = False                     # a direct write has succeeded
        self.buffers: list[mmap.mmap] = []      # free ones
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[tuple[Future[None], int, mmap.mmap]] = deque()
        # runs are read in the source's order: a larger readahead halves a
        # cold copy's time here (2 GiB: 1.95 s -> 0.92 s)
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                _set_direct(dst, True)
                self.direct = True
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise

    def __enter__(self) -> _DataMover:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self._wait_oldest()
        finally:
            self._stop_workers()
            if self.direct:
                self.direct = False
                _set_direct(self.dst, False)

    def _stop_workers(self) -> None:
        """Wait for the chunks in flight (at most DIRECT_WORKERS writes): the caller
        closes and removes the file next. A Ctrl-C meanwhile is held back until
        they are done, then raised."""
        if self.pool is None:
            return
        interrupted: KeyboardInterrupt | None = None
        while True:
            try:
                self.pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy a run. Source bytes past its end read as zeros: left as a hole."""
        end = src + length
        if self.direct:
            self._read_ahead(src, min(end, src + READ_AHEAD))
        while src < end:
            if self.direct:
                moved = min(DIRECT_CHUNK, end - src)
                self._read_ahead(src + READ_AHEAD, min(end, src + READ_AHEAD + moved))
                self._direct(src, dst, moved)
            else:
                moved = self._copy_chunk(src, dst, min(CHUNK, end - src))
                if moved == 0:          # end of the source file
                    self._report(end - src)
                    return
                _start_writeback(self.dst, dst, moved)
                self._report(moved)
            src += moved
            dst += moved

    def _read_ahead(self, start: int, end: int) -> None:
        """Have the kernel start reading [start, end) of the source now: the chunks
        in flight read what is already on its way (a cold 2 GiB copy here: 3.3-6.0 s
        without, 2.4-2.9 s with)."""
        if start < end:
            os.posix_fadvise(self.src, start, end - start, os.POSIX_FADV_WILLNEED)

    def _direct(self, src: int, dst: int, n: int) -> None:
        if not self.proven:
            with self._borrowed() as buf:
                self._direct_chunk(buf, src, dst, n)
            self._report(n)
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(DIRECT_WORKERS, "layercopy")
        if len(self.pending) == DIRECT_WORKERS:
            self._wait_oldest()
        buf = self._buffer()
        self.pending.append((self.pool.submit(self._direct_chunk, buf, src, dst, n), n, buf))

    def _buffer(self) -> mmap.mmap:
        return self.buffers.pop() if self.buffers else mmap.mmap(-1, DIRECT_CHUNK)

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[mmap.mmap]:
        """A buffer for the calling thread, free again afterwards."""
        buf = self._buffer()
        try:
            yield buf
        finally:
            self.buffers.append(buf)

    def _wait_oldest(self) -> None:
        done, n, buf = self.pending.popleft()
        done.result()
        self.buffers.append(buf)
        self._report(n)

    def _direct_chunk(self, buf: mmap.mmap, src: int, dst: int, n: int) -> None:
        """Read n bytes at src into buf (fewer at the source's end, none past it)
        and write them at dst."""
        view = memoryview(buf)
        try:
            got = 0
            while got < n:
                k = os.preadv(self.src, [view[got:n]], src + got)
                if k == 0:
                    break
                got += k
            if got:
                padded = -(-got // DIRECT_ALIGN) * DIRECT_ALIGN
                view[got:padded] = bytes(padded - got)
                self._direct_write(view[:padded], dst)
        finally:
            view.release()

    def _direct_write(self, data: memoryview, dst: int) -> None:
        try:
            _pwrite_all(self.dst, data, dst)
        except OSError as e:
            if self.proven or e.errno not in _FALLBACK_ERRNOS:
                raise
            self.direct = False             # refused from the start: the page cache
            _set_direct(self.dst, False)
            _pwrite_all(self.dst, data, dst)
        else:
            self.proven = True

    def _copy_chunk(self, src: int, dst: int, n: int) -> int:
        if self.use_copy_file_range:
            try:
                return os.copy_file_range(self.src, self.dst, n, src, dst)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self.use_copy_file_range = False
        data = os.pread(self.src, n, src)
        _pwrite_all(self.dst, data, dst)
        return len(data)

    def write(self, data: bytes, dst: int) -> None:
        """Write whole inflated clusters (at most DIRECT_CHUNK bytes) at dst."""
        while self.pending:
            self._wait_oldest()
        if self.direct:
            with self._borrowed() as buf, memoryview(buf) as view:
                view[:len(data)] = data
                self._direct_write(view[:len(data)], dst)
        else:
            _pwrite_all(self.dst, data, dst)
        self._report(len(data))

    def _report(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)


_sync_file_range: Callable[[int, int, int], None] | None = None


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): start writing back a
    range now, without waiting; a no-op where libc has no such call. Looked up
    in the process's own symbols (no search for libc: that runs ldconfig)."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, n: None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    write = 2                                   # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, n: int) -> None:
        call(fd, offset, n, write)              # advisory: a failure only loses the head start

    return start


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """Let the disk write a copied chunk while the next one is copied, so that the
    copy's final fsync finds little left to do (the page-cache path only)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _load_sync_file_range()
    _sync_file_range(fd, offset, n)


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n
