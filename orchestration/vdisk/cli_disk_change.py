"""``vdisk disk remove|rename|resize``: the changes of a disk as a whole.

Served, each goes through the server: removing or renaming a disk stops its
worker (refused while clients are attached) and, for a rename, starts one
for the new name on the new name's endpoint; a resize runs in the disk's
worker. Offline, each takes the disk's ownership for the time it runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cli_common import emit, parse_size, service
from .progress import human_bytes


def add_parsers(dsub: Any, parents: list[Any]) -> None:
    p = dsub.add_parser("remove", parents=parents,
                        help="remove a disk and the images no other disk uses")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--keep-images", action="store_true",
                   help="only forget the disk; leave its images in place")
    p.set_defaults(func=cmd_disk_remove)

    p = dsub.add_parser("rename", parents=parents,
                        help="give a disk another name (served: its export and endpoint too)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(func=cmd_disk_rename)

    p = dsub.add_parser("resize", parents=parents,
                        help="change a disk's virtual size (clients see it when they "
                             "connect again)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE", type=parse_size, help="the new size: 20G, 512M...")
    p.add_argument("--shrink", action="store_true",
                   help="allow a smaller size (only down to the disk's data)")
    p.set_defaults(func=cmd_disk_resize)


def cmd_disk_remove(args: argparse.Namespace) -> int:
    with service(args) as svc:
        result = svc.execute("disk-remove", {"disk": args.name,
                                             "keep_images": bool(args.keep_images)})
    deleted, kept = result["deleted"], result["kept"]
    text = f"removed disk {args.name}"
    if deleted:
        text += f"; deleted {', '.join(deleted)}"
    if kept:
        text += f"; kept {', '.join(kept)}"
    emit(args, {"disk": args.name, "deleted": deleted, "kept": kept}, text)
    return 0


def cmd_disk_rename(args: argparse.Namespace) -> int:
    with service(args) as svc:
        out = svc.execute("disk-rename", {"disk": args.name, "new": args.new})
    worker = out.get("worker")
    text = f"renamed disk {args.name} to {args.new}"
    if worker:
        text += f"; served on {worker['uri']}"
    emit(args, {**out, "uri": worker["uri"] if worker else None}, text)
    return 0


def cmd_disk_resize(args: argparse.Namespace) -> int:
    with service(args) as svc:
        out = svc.execute("resize", {"disk": args.name, "size": args.size,
                                     "shrink": bool(args.shrink)})
    if out["size"] == out["was"]:
        text = f"disk {args.name} is {human_bytes(out['size'])} already"
    else:
        text = f"resized disk {args.name}: {human_bytes(out['was'])} -> " \
               f"{human_bytes(out['size'])}"
        if out["clients"]:
            text += (f"; {out['clients']} client(s) attached see the new size when they "
                     "connect again (NBD has no size-change notice)")
    emit(args, out, text)
    return 0
