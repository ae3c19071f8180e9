"""``vdisk datastore init`` and ``vdisk disk create|import|list|info|remove``.

Creating and importing work on the files: every image is written under a
temporary name in the datastore's ``images/`` that this command owns
(``.NAME.creating``, ``.NAME.import``: vdisk_block.files), renamed into place
without replacing anything when complete, and the catalog learns the disk
last. An interrupted command leaves no disk behind, at most a stale
temporary, which the next create or import (or a server's recovery) removes.
Two commands never write one name: a temporary reserves its final name.
Listing, showing and removing go through the datastore's service, so they see
what a server sees.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# blockpath makes vdisk_block (the block engine beside the plugin) importable
from . import blockpath, cli_disk_change, cli_disk_show, qemu_img  # noqa: F401
from .cli_common import (
    IMAGE_RULE,
    CliError,
    control_options,
    datastore_dir,
    datastore_image,
    datastore_options,
    emit,
    output_options,
    parse_size,
    service,
)
from .progress import human_bytes
from .routing import is_served

CLUSTER_BITS = 16       # the cluster size of the disks ``disk create`` makes


def add_parsers(sub: Any) -> None:
    out, ds, ctl = output_options(), datastore_options(), control_options()

    p = sub.add_parser("datastore", help="create a datastore")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = dsub.add_parser("init", parents=[out], help="make DIR a datastore (idempotent)")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=cmd_datastore_init)

    p = sub.add_parser("disk", help="create, import, list, info and remove disks")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = dsub.add_parser("create", parents=[out, ds],
                        help="create an empty disk, or a linked clone of a frozen image")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", type=parse_size,
                   help="virtual size: 10G, 512M... (required without --backing; with it, "
                        "default the backing image's size)")
    p.add_argument("--backing", metavar="IMAGE",
                   help="a linked clone: the new disk's chain continues this image of the "
                        "datastore, which must be frozen (no disk's top): " + IMAGE_RULE)
    p.set_defaults(func=cmd_disk_create)

    p = dsub.add_parser("import", parents=[out, ds],
                        help="copy an image (and its backing chain) in as a disk")
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE", help="any image qemu-img reads")
    p.add_argument("--flatten", action="store_true",
                   help="copy the whole chain into one image instead of keeping its layers")
    p.add_argument("--force-share", action="store_true",
                   help="copy even images another process (QEMU) holds open for writing; "
                        "the copy may then be inconsistent")
    p.set_defaults(func=cmd_disk_import)

    cli_disk_show.add_parsers(dsub, [out, ds, ctl])
    cli_disk_change.add_parsers(dsub, [out, ds, ctl])


@contextmanager
def catalog(args: argparse.Namespace) -> Iterator[Any]:
    from vdisk_block.catalog import Catalog

    c = Catalog(datastore_dir(args))
    try:
        yield c
    finally:
        c.close()


def check_new_disk(c: Any, name: str) -> None:
    """Refuse early what Catalog.add_disk would refuse after the copy."""
    from vdisk_block.catalog import check_disk_name

    check_disk_name(c.dir, name)
    if any(row["name"] == name for row in c.disks()):
        raise CliError(f"disk {name!r} already exists")


def _sweep(c: Any) -> None:
    """Remove the temporaries of creates and imports that died (never a live one)."""
    from vdisk_block.catalog import IMAGES
    from vdisk_block.files import sweep_stale_temps

    sweep_stale_temps(c.abspath(IMAGES))


# --- datastore init ----------------------------------------------------------------


def cmd_datastore_init(args: argparse.Namespace) -> int:
    from vdisk_block.catalog import DB_NAME, Catalog

    directory = os.path.abspath(args.directory)
    existed = os.path.exists(os.path.join(directory, DB_NAME))
    Catalog.init(directory).close()
    verb = "already a datastore" if existed else "initialized datastore"
    emit(args, {"datastore": directory, "created": not existed}, f"{verb} {directory}")
    return 0


# --- disk create / import ------------------------------------------------------------


def cmd_disk_create(args: argparse.Namespace) -> int:
    from vdisk_block.chainops import relative_backing
    from vdisk_block.create import create_qcow2
    from vdisk_block.usage import images_lock

    with catalog(args) as c, images_lock(c.dir, f"vdisk disk create {args.name}"):
        # (under the images lock: the image a clone starts from is not deleted
        # between the checks below and the catalog naming the clone)
        check_new_disk(c, args.name)
        backing = _frozen_image(c, args.backing) if args.backing else None
        try:
            size = _new_size(args, backing)
            _sweep(c)
            rel = c.new_image_path(args.name)
            path = c.abspath(rel)
            create_qcow2(path, size, cluster_bits=CLUSTER_BITS,
                         backing=relative_backing(path, backing.path) if backing else None,
                         backing_format="qcow2" if backing else None,
                         parent_id=backing.identity.content_id if backing else None)
        except FileExistsError:
            check_new_disk(c, args.name)    # another create of this disk won the name
            raise
        finally:
            if backing is not None:
                backing.close()
        try:
            c.add_disk(args.name, rel)
        except BaseException:
            os.unlink(path)             # create_qcow2 put it there, never replacing a file
            raise
    out = {"disk": args.name, "top": rel, "size": size,
           "backing": c.relpath(backing.path) if backing else None}
    text = f"created disk {args.name} ({human_bytes(size)}): {rel}"
    if backing is not None:
        text += f", a linked clone of {out['backing']}"
    out.update(serve_new(args))
    emit(args, out, text + served_text(out))
    return 0


def serve_new(args: argparse.Namespace) -> dict[str, Any]:
    """A disk just added to a served datastore gets its worker now: its endpoint
    and the worker's state, once the worker serves (or says why not)."""
    with service(args) as svc:
        if not is_served(svc):
            return {"uri": None, "worker": None}
        worker = svc.execute("disk-added", {"disk": args.name})["worker"]
    return {"uri": worker["uri"], "worker": worker}


def served_text(out: dict[str, Any]) -> str:
    w = out.get("worker")
    if not w:
        return ""
    return f"; served on {w['uri']}" if w["state"] == "running" else \
        f"; not served: {w['state']}" + (f" ({w['error']})" if w["error"] else "")


def _new_size(args: argparse.Namespace, backing: Any) -> int:
    """The new disk's size: --size, else the backing image's; refused up front
    when no image of CLUSTER_BITS clusters can be that large (as qemu-img)."""
    from vdisk_block.header import max_virtual_size

    size: int | None = args.size
    if backing is not None:
        if size is None:
            size = int(backing.size)
        elif size < backing.size:
            raise CliError(f"--size {size} is smaller than {args.backing} "
                           f"({backing.size} bytes)")
    elif size is None:
        raise CliError("--size is required (or --backing IMAGE for a linked clone)")
    largest = max_virtual_size(CLUSTER_BITS)
    if size > largest:
        raise CliError(f"--size {human_bytes(size)} is too large: a qcow2 image with "
                       f"{human_bytes(1 << CLUSTER_BITS)} clusters holds at most "
                       f"{human_bytes(largest)} ({largest} bytes)")
    return size


def _frozen_image(c: Any, name: str) -> Any:
    """The image a linked clone continues, opened read-only (the caller closes it):
    a qcow2 image of the datastore with a valid content ID that no disk writes,
    and a moment of its disk (no consolidation into it was left half done)."""
    from vdisk_block import recovery
    from vdisk_block.chain import open_chain

    given, argument = datastore_image(c.dir, name)
    path = os.path.join(c.dir, argument)        # under the datastore's name, as its tops
    for disk in c.disks():
        if os.path.realpath(c.abspath(disk["top"])) == os.path.realpath(path):
            raise CliError(f"{name} is the top of disk {disk['name']!r}: snapshot it first, "
                           "a linked clone needs a frozen image")
    why = recovery.not_a_moment(c, argument)
    if why is not None:
        raise CliError(f"{name} {why}")
    layers = open_chain(path, readonly=True)    # refuses a modified parent
    for f in layers[1:]:
        f.close()
    f = layers[0]
    if f.fmt != "qcow2" or not f.identity.valid:
        f.close()
        raise CliError(f"{name} has no valid content ID ({f.identity.reason}); "
                       f"give it one with 'vdisk identity stamp {shlex.quote(given)}' first")
    return f


def cmd_disk_import(args: argparse.Namespace) -> int:
    from vdisk_block.catalog import IMAGES
    from vdisk_block.files import IMPORT_SUFFIX, fsync_dir

    source = os.path.abspath(args.file)
    if not os.path.exists(source):
        raise CliError(f"{args.file}: no such file")
    chain = qemu_img.info(source, backing_chain=True, force_share=True)
    if not args.force_share:
        _check_unlocked([args.file, *(layer["filename"] for layer in chain[1:])])
    share = ["-U"] if args.force_share else []
    with catalog(args) as c:
        check_new_disk(c, args.name)
        _sweep(c)
        count = 1 if args.flatten else len(chain)
        # each copy is written into a temporary this command owns, which reserves
        # its final name; qemu-img writes into the file it is given (same inode)
        temps = c.reserve_image_paths(args.name, count, IMPORT_SUFFIX)
        finals = [t.final for t in temps]
        try:
            if args.flatten:
                qemu_img.run(["convert", "-q", *share, "-f", chain[0]["format"], "-O", "qcow2",
                              source, temps[0].path])
            else:
                _copy_layers(chain, [t.path for t in temps], finals, share)
            _stamp([t.path for t in temps])
            for t in temps:
                os.fsync(t.fd)
            for t in reversed(temps):   # base first: a renamed image's backing file is
                t.commit()              # in place; an existing name is never replaced
            fsync_dir(c.abspath(IMAGES))
            top = c.relpath(finals[0])
            c.add_disk(args.name, top)
        except BaseException:
            for t in temps:             # only the files this command created
                t.discard()
            raise
        finally:
            for t in temps:
                t.close()
    size = int(chain[0]["virtual-size"])
    images = [c.relpath(p) for p in finals]
    out = {"disk": args.name, "top": top, "chain": images, "size": size,
           "source": source, "flattened": bool(args.flatten), **serve_new(args)}
    emit(args, out, f"imported {args.file} as disk {args.name} ({human_bytes(size)}, "
         f"{len(images)} image{'s' if len(images) != 1 else ''}): {top}{served_text(out)}")
    return 0


def _stamp(paths: list[str]) -> None:
    """Give imported images (top first) fresh content IDs, each child recording its
    parent's: the copies are new images of this datastore."""
    from vdisk_block import identity

    parent = None
    for path in reversed(paths):
        parent = identity.write_path(path, identity.new_id(), parent).content_id


def _check_unlocked(paths: list[str]) -> None:
    """Refuse to copy an image another process may be writing: QEMU's lock bytes
    (vdisk_block.locking) say whether it could be read consistently. qemu-img
    then takes the same locks for the copy."""
    from vdisk_block import locking
    from vdisk_block.errors import ImageLocked

    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue            # not a local file: qemu-img opens it (and says why not)
        try:
            locking.lock_for_read(fd, path)
        except ImageLocked as e:
            raise CliError(f"{path} is in use: {e.reason} (QEMU's image lock); stop that "
                           "process first, or copy the image anyway with --force-share") \
                from None
        finally:
            os.close(fd)        # and with it the locks taken


def _copy_layers(chain: list[dict[str, Any]], temps: list[str], finals: list[str],
                 share: list[str]) -> None:
    """Copy each layer base first, keeping only its own clusters; link to the copies.

    ``qemu-img convert -B PARENT`` writes only what the source layer itself
    allocates; the copy names its parent's temporary file until ``rebase -u``
    points it at the parent's final name (relative, in the same directory).
    """
    for i in reversed(range(len(chain))):
        layer = chain[i]
        cmd = ["convert", "-q", *share, "-f", layer["format"], "-O", "qcow2"]
        if i + 1 < len(chain):
            cmd += ["-B", temps[i + 1], "-F", "qcow2"]
        qemu_img.run([*cmd, layer["filename"], temps[i]])
    for i in range(len(chain) - 1):
        qemu_img.run(["rebase", "-q", "-u", "-f", "qcow2", "-b", os.path.basename(finals[i + 1]),
                      "-F", "qcow2", temps[i]])
