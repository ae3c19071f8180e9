"""Metadata of the writable top image: L1/L2 in memory, written back at flush.

L2 tables of the top are all kept in memory (they were read to build the
cluster map anyway). A changed L2 entry is written into the file at once (a
new L2 table whole and synced before the L1 entry that points at it), after
the refcount that makes it valid, which the cluster reserve has put on disk
already (refcounts.py): a write acknowledged before the process died is in
the file (the page cache keeps it), and a flush makes it all durable with one
sync, before it drops the refcounts of what the entries stopped using (and
of the reserve's unused clusters: a flushed image checks clean).
"""

from __future__ import annotations

import os
import struct
from array import array
from collections import Counter

from . import header as hdr
from . import identity as ident
from . import lanes
from .errors import ImageError, MalformedImage, UnsupportedImage
from .image import COMPRESSED, COPIED, OFFSET_MASK, Qcow2File
from .refcounts import Refcounts


class TopImage:
    """Writable view of a qcow2 file: entry lookup, update, allocation, flush."""

    def __init__(self, f: Qcow2File) -> None:
        h = f.header
        if h.nb_snapshots:
            raise UnsupportedImage(f.path, "internal snapshots (writing is not supported)")
        if h.incompatible & hdr.INCOMPAT_DIRTY:
            raise UnsupportedImage(f.path, "the dirty bit is set (lazy refcounts); "
                                   "repair with 'qemu-img check -r all'")
        self.f = f
        self.fd = f.fd
        self.path = f.path
        self.cs = f.cluster_size
        self.span = h.l2_entries
        self.v3 = h.version >= 3
        self.l1 = f.l1
        self.l2: dict[int, array] = {}
        # Another process may have written the file and not synced it (a
        # killed worker's acknowledged writes sit in the page cache): the
        # first flush syncs, whatever this process wrote.
        self.data_dirty = True
        self.refcounts = Refcounts(f.fd, f.path, h, f.file_size)
        self._fresh_id_pending = True
        for l1_index, _off, l2 in f.l2_tables():
            self.l2[l1_index] = l2
        self._check_references()

    # -- validation -------------------------------------------------------

    def _check_references(self) -> None:
        """Every cluster must have a refcount at least its number of references.

        A lower refcount (or two L2 entries sharing a cluster with refcount 1)
        would let an allocation overwrite live data, so such an image is refused.
        """
        if not self._references_fit():
            self._check_references_one_by_one()

    def _references_fit(self) -> bool:
        """The check above in bulk, for images whose data clusters are
        referenced once each and hold no compressed cluster: True when it
        would pass, False when _check_references_one_by_one must say what is
        wrong (or look at compressed or shared clusters)."""
        cs, h, f = self.cs, self.f.header, self.f
        meta: Counter[int] = Counter()
        for offset, length in ((0, cs), (h.l1_table_offset, h.l1_size * 8),
                               (h.refcount_table_offset, h.refcount_table_clusters * cs)):
            meta.update(range(offset // cs, (offset + length - 1) // cs + 1))
        meta.update(map(cs.__rfloordiv__, filter(None, self.refcounts.table)))
        tables = [(self.l1[i] & OFFSET_MASK) // cs for i in self.l2]
        meta.update(tables)
        if any(meta[c] > 1 for c in tables):
            return False                # an L2 table shared (it is written in place)
        data: set[int] = set()
        referenced = 0                  # data references, counted once per entry
        for l2 in self.l2.values():
            offsets = f.plain_offsets(l2, len(l2))
            if offsets is None:
                return False
            # offsets are cluster aligned: the shift moves no bit out of its lane
            clusters = lanes.entries(offsets >> f.cluster_bits, len(l2))
            referenced += lanes.nonzero(offsets, len(l2)).bit_count()
            data.update(clusters)
        data.discard(0)
        if len(data) != referenced or not data.isdisjoint(meta):
            return False                # a cluster shared between entries, or with metadata
        counts, used = self.refcounts.counts, self.refcounts.used
        known = len(counts)
        if data and (max(data) >= known or not all(map(used.__getitem__, data))):
            return False
        return not [c for c, n in meta.items() if c >= known or n > counts[c]]

    def _check_references_one_by_one(self) -> None:
        cs, h, rc = self.cs, self.f.header, self.refcounts
        refs: dict[int, int] = {}

        def ref(offset: int, length: int, what: str) -> None:
            for c in range(offset // cs, (offset + length - 1) // cs + 1):
                refs[c] = refs.get(c, 0) + 1
                if refs[c] > rc.get(c):
                    raise MalformedImage(self.path, f"cluster {c} ({what}) has refcount "
                                         f"{rc.get(c)} but {refs[c]} references; repair "
                                         "with 'qemu-img check -r all'")

        ref(0, cs, "header")
        ref(h.l1_table_offset, h.l1_size * 8, "L1 table")
        ref(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        for off in rc.table:
            if off:
                ref(off, cs, "refcount block")
        copied: dict[int, int] = {}     # cluster -> a guest offset whose entry says COPIED
        tables = {(self.l1[i] & OFFSET_MASK) // cs: i for i in self.l2}
        for l1_index, l2 in self.l2.items():
            ref(self.l1[l1_index] & OFFSET_MASK, cs, "L2 table")
            for k, e in enumerate(l2):
                if e & COMPRESSED:
                    off, size = self.f.compressed_extent(e)
                    ref(off, size, "compressed data")
                elif e & OFFSET_MASK:
                    guest = (l1_index * self.span + k) * cs
                    self.f.check_l2_entry(e, guest)
                    ref(e & OFFSET_MASK, cs, f"data of guest offset {guest}")
                    if e & COPIED:
                        copied[(e & OFFSET_MASK) // cs] = guest
        # an L2 table is written in place (whatever its L1 entry says)
        for c, l1_index in tables.items():
            if refs[c] > 1:
                raise MalformedImage(self.path, f"cluster {c} (L2 table of L1 entry {l1_index}) "
                                     f"has {refs[c]} references; repair with "
                                     "'qemu-img check -r all'")
        # COPIED lets a write land in place: a cluster shared with anything
        # else (even with a refcount that counts it) would change there too
        for c, guest in copied.items():
            if refs[c] > 1:
                raise MalformedImage(self.path, f"cluster {c} (data of guest offset {guest}) is "
                                     f"marked as used once but has {refs[c]} references; "
                                     "repair with 'qemu-img check -r all'")

    # -- entries ------------------------------------------------------------

    def entry(self, cluster: int) -> int:
        l2 = self.l2.get(cluster // self.span)
        return l2[cluster % self.span] if l2 is not None else 0

    def set_entry(self, cluster: int, value: int) -> None:
        """Set an L2 entry, in memory and in the file (see the module's doc)."""
        i, k = divmod(cluster, self.span)
        l2 = self.l2.get(i)
        self.data_dirty = True
        if l2 is None:
            if not value:
                return
            off = self.refcounts.allocate(1)
            l2 = array("Q", bytes(self.cs))
            l2[k] = value
            table = array("Q", l2)
            table.byteswap()
            os.pwrite(self.fd, table.tobytes(), off)
            os.fdatasync(self.fd)               # the table, before anything points at it
            self.l2[i] = l2
            self.l1[i] = off | COPIED
            os.pwrite(self.fd, struct.pack(">Q", self.l1[i]),
                      self.f.header.l1_table_offset + 8 * i)
            return
        l2[k] = value
        os.pwrite(self.fd, struct.pack(">Q", value), (self.l1[i] & OFFSET_MASK) + 8 * k)

    def release(self, entry: int) -> None:
        """Drop the clusters an entry being replaced referred to (after flush)."""
        rc = self.refcounts
        if entry & COMPRESSED:
            off, size = self.f.compressed_extent(entry)
            for c in range(off // self.cs, (off + size - 1) // self.cs + 1):
                rc.free_later(c)
        elif entry & OFFSET_MASK:
            rc.free_later((entry & OFFSET_MASK) // self.cs)

    def begin_write(self) -> None:
        """Before the first change of data after open: a fresh content ID."""
        if self._fresh_id_pending:
            self.refresh_identity()

    def refresh_identity(self, content_id: bytes | None = None) -> None:
        """Give the image a fresh content ID, durably, recording its backing
        file's current content ID as the parent ID (none if that is not valid).

        The fresh ID names the image's data over its backing file as it is now,
        whatever the image recorded before (a chain that opened has recorded
        that ID already, if any): an image another writer changed, or one that
        recorded no parent ID, is thus tied to its parent again, and a later
        change of the parent is refused by the chain check.

        Like QEMU, a writer that does not maintain an autoclear feature (dirty
        bitmaps, ...) clears its bit; vdisk's own identity bit is set. An image
        that cannot carry an ID (no room left in its header cluster) is left
        with an unknown identity; a v2 image has no autoclear bits at all.
        """
        f, h = self.f, self.f.header
        if h.version >= 3:
            parent = self._parent_content_id()
            try:
                f.identity = ident.write(self.fd, self.path, h, content_id or ident.new_id(),
                                         parent, autoclear=0)
            except UnsupportedImage:
                if h.autoclear:
                    hdr.write_u64(self.fd, hdr.OFF_AUTOCLEAR, 0)
                    os.fdatasync(self.fd)
                    h.autoclear = 0
                f.identity = ident.of_header(h)
        self._fresh_id_pending = False

    def _parent_content_id(self) -> bytes | None:
        """The backing file's content ID, read from its header now, if it is valid.
        (The chain holds the backing file read-locked: nobody else writes it.)"""
        if not self.f.backing_file:
            return None
        from .chain import resolve_backing  # (chain imports this module)
        try:
            _h, parent = ident.read(resolve_backing(self.path, self.f.backing_file))
        except (OSError, ImageError):
            return None
        return parent.content_id if parent.valid else None

    def identity_for_child(self) -> bytes | None:
        """The content ID a child created now records: the current one, or a
        fresh one for an image whose identity is unknown (its data is ours)."""
        if not self.f.identity.valid:
            self.refresh_identity()
        return self.f.identity.content_id

    # -- flush ----------------------------------------------------------------

    def fsync_data(self) -> None:
        """What was written so far durable (no refcount changes: a consistent
        image after a crash, with the reserve's clusters leaked at worst)."""
        os.fdatasync(self.fd)

    def flush(self) -> None:
        """Everything written so far durable (data, entries, refcounts: one sync);
        then the refcounts of what the entries stopped using, and of the unused
        reserve, dropped (a second sync, when there are any)."""
        rc = self.refcounts
        rc.write_increments(self.data_dirty)
        self.data_dirty = False
        rc.release_reserved()
        rc.release_pending()
