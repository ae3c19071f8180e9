"""``vdisk info IMAGE``, ``vdisk identity stamp IMAGE`` and ``vdisk replicate``.

Content identity (docs/content-id.md) and the reconstruction of a chain on a
second datastore (docs/replicate.md).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from . import blockpath  # noqa: F401  (makes vdisk_block importable)
from .cli_common import (
    IMAGE_RULE,
    CliError,
    control_options,
    datastore_dir,
    datastore_image,
    emit,
    output_options,
    service,
)
from .progress import ProgressBar, human_bytes, human_duration
from .routing import is_served


def add_parsers(sub: Any) -> None:
    out, ctl = output_options(), control_options()

    p = sub.add_parser("info", parents=[out],
                       help="show a chain with its content IDs and their validity: of an "
                            "image file, or with -d of a disk or an image of the datastore")
    p.add_argument("image", metavar="IMAGE|DISK",
                   help="an image file; with -d, a disk's name or an image of the datastore: "
                        + IMAGE_RULE)
    p.add_argument("-d", "--datastore", metavar="DIR",
                   help="the datastore: IMAGE|DISK is then a disk or one of its images, and "
                        "the paths printed are relative to it")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("identity", help="content identity of images")
    isub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = isub.add_parser("stamp", parents=[out],
                        help="give an image whose identity is unknown a fresh content ID")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_identity_stamp)

    p = sub.add_parser("replicate", parents=[out, ctl],
                       help="recreate a disk's chain on another datastore, copying only "
                            "the layers it does not have yet")
    p.add_argument("source", metavar="DISK|IMAGE", nargs="+",
                   help="disks of the datastore given with -d (replicated one after "
                        "another), or else one image file")
    p.add_argument("-d", "--datastore", metavar="DIR",
                   help="the source datastore (SOURCE is then a disk name)")
    p.add_argument("--to", required=True, metavar="TARGET_DIR",
                   help="the target datastore (created when missing or empty)")
    p.add_argument("--name", metavar="NAME",
                   help="the disk's name on the target (default: the same name)")
    p.add_argument("--verify", action="store_true",
                   help="compare every target image with its source (qemu-img compare)")
    p.set_defaults(func=cmd_replicate)


# --- info ----------------------------------------------------------------------------------


def chain_identity(top: str) -> list[dict[str, Any]]:
    """Each image of the chain (top first) with its identity and whether the image
    above it recorded this image's current content ID."""
    from vdisk_block import identity
    from vdisk_block.chain import chain_paths

    layers: list[dict[str, Any]] = []
    above: Any = None
    for path in chain_paths(top):
        h, ident = identity.read(path)
        layer = {"image": path, "format": "qcow2" if h else "raw",
                 "virtual_size": h.size if h else os.path.getsize(path),
                 "backing": h.backing_file if h else None, **ident.describe(),
                 "link": None}
        if above is not None:
            why = identity.parent_mismatch(above, ident)
            layers[-1]["link"] = ("not recorded" if not above.valid or above.parent_id is None
                                  else "ok" if why is None else
                                  f"parent modified since the child was created: {why}")
        layers.append(layer)
        above = ident
    return layers


def cmd_info(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {}
    if args.datastore is None:
        if not os.path.exists(args.image):
            raise CliError(f"{args.image}: no such image")
        top = os.path.abspath(args.image)
        layers = chain_identity(top)
    else:
        directory = datastore_dir(args)
        disk = _disk_top(directory, args.image)
        if disk is not None:
            out["disk"] = args.image
            top = os.path.join(directory, disk)
        elif os.path.lexists(os.path.join(directory, args.image)):
            top = datastore_image(directory, args.image)[0]
        else:
            raise CliError(f"{args.image}: no such disk or image in the datastore {directory}")
        layers = chain_identity(top)
        top = os.path.relpath(top, directory)
        for layer in layers:
            layer["image"] = os.path.relpath(layer["image"], directory)
    out.update(image=top, chain=layers)
    what = f"disk {out['disk']}" if "disk" in out else top
    lines = [f"chain of {what} (top first):"]
    for i, layer in enumerate(layers):
        lines.append(f"{'  ' * i}{layer['image']}")
        pad = "  " * i + "    "
        lines.append(f"{pad}format {layer['format']}, {human_bytes(layer['virtual_size'])}")
        if layer["state"] == "valid":
            lines.append(f"{pad}content ID {layer['content_id']} (valid)")
        else:
            lines.append(f"{pad}content ID: identity {layer['state']}: {layer['reason']}")
        if layer["backing"] is not None:
            lines.append(f"{pad}parent ID  {layer['parent_id'] or '-'} ({layer['link']})")
    emit(args, out, "\n".join(lines))
    return 0


def _disk_top(directory: str, name: str) -> str | None:
    """The top image (datastore-relative) of the disk ``name``, None if there is none."""
    from vdisk_block.catalog import Catalog

    c = Catalog(directory)
    try:
        tops = {row["name"]: row["top"] for row in c.disks()}
    finally:
        c.close()
    return tops.get(name)


# --- identity stamp ----------------------------------------------------------------------------


def cmd_identity_stamp(args: argparse.Namespace) -> int:
    from vdisk_block import identity
    from vdisk_block.chain import chain_paths

    path = os.path.abspath(args.image)
    if not os.path.exists(path):
        raise CliError(f"{args.image}: no such image")
    h, ident = identity.read(path)
    if h is None:
        raise CliError(f"{args.image} is a raw image: it cannot carry a content ID")
    if ident.valid:
        raise CliError(f"{args.image} already has a valid content ID "
                       f"{identity.format_id(ident.content_id)}")
    parent_id = None
    chain = chain_paths(path)
    if len(chain) > 1:
        _hp, parent = identity.read(chain[1])
        parent_id = parent.content_id if parent.valid else None
    new = identity.write_path(path, identity.new_id(), parent_id)
    out = {"image": path, **new.describe()}
    text = f"stamped {args.image}: content ID {out['content_id']}"
    if len(chain) > 1:
        text += (f", parent ID {out['parent_id']}" if parent_id else
                 f", no parent ID (the identity of {chain[1]} is unknown)")
    emit(args, out, text)
    return 0


# --- replicate ----------------------------------------------------------------------------------


def cmd_replicate(args: argparse.Namespace) -> int:
    from . import replicate

    bar = ProgressBar("replicate", 0, enabled=not args.json)

    def progress(done: int, total: int, label: str) -> None:
        bar.update(done, total, label=f"copy {label}")

    t0 = time.monotonic()
    session = replicate.Session(args.to, verify=args.verify, progress=progress)
    with bar:
        if args.datastore is None:
            if len(args.source) != 1:
                raise CliError("several sources need -d DIR (they are then disks)")
            if args.name is not None:
                raise CliError("--name needs a disk (-d DIR DISK)")
            if not os.path.exists(args.source[0]):
                raise CliError(f"{args.source[0]}: no such image")
            with session:
                session.add(args.source[0])
            snapshots: list[Any] = [None]
        else:
            if args.name is not None and len(args.source) != 1:
                raise CliError("--name names one disk")
            directory = datastore_dir(args)
            if os.path.realpath(directory) == os.path.realpath(args.to):
                raise CliError("the target datastore is the source datastore")
            snapshots = []
            with service(args) as svc, session:
                tops = {name: svc.execute("query-disks", {"disk": name})["disks"][0]["top"]
                        for name in args.source}             # every disk exists, first
                for top in tops.values():                    # and its chain is sound
                    replicate.check_source(os.path.join(directory, top))
                # then the target, before a served source is snapshotted: a target
                # that is no datastore, or a disk there that cannot be refreshed,
                # leaves the source as it was
                session.check_disks([args.name] if args.name else args.source)
                for name in args.source:
                    snap = None
                    top = os.path.join(directory, tops[name])
                    if is_served(svc):
                        # the copied top must not change while it is read: freeze it
                        snap = svc.execute("snapshot", {"disk": name})
                        top = os.path.join(directory, snap["frozen"])
                    snapshots.append(snap)
                    session.add(top, disk=args.name or name)
    results = session.results
    for result, snap in zip(results, snapshots, strict=True):
        result["snapshot"] = snap
    text = "\n".join(_replicate_text(r) for r in results)
    if len(results) == 1:
        emit(args, results[0], text)
    else:
        # the disks overlap (one is synced while the next is copied): their
        # durations do not add up to the command's
        emit(args, {"results": results, **{k: sum(r[k] for r in results) for k in
                                           ("copied", "linked", "bytes_moved")},
                    "duration_s": time.monotonic() - t0}, text)
    return 0


def _replicate_text(result: dict[str, Any]) -> str:
    lines = []
    for layer in result["layers"]:
        what = (f"copied  {human_bytes(layer['bytes_moved']):>10}" if layer["action"] == "copied"
                else f"linked  {'':>10}")
        lines.append(f"  {what}  {layer['image']}  <- {layer['source']}"
                     f"{'  (verified)' if layer['verified'] else ''}")
    source = result["disk"] or result["source"]
    head = (f"replicated {source} to {result['target']}: {result['copied']} copied, "
            f"{result['linked']} linked, {human_bytes(result['bytes_moved'])} moved in "
            f"{human_duration(result['duration_s'])}")
    if result["disk"]:
        head += f"\ndisk {result['disk']} on the target: top {result['top']}"
        if result["previous_top"]:
            head += f" (refreshed: was {result['previous_top']})"
    return "\n".join([head, *lines])
