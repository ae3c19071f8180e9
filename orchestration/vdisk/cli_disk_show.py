"""``vdisk disk list|info|uri``: a datastore's disks as the server (or, offline,
the files) show them, with each served disk's endpoint."""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import qemu_img
from .cli_common import CliError, datastore_dir, emit, service
from .progress import human_bytes
from .routing import is_served


def add_parsers(dsub: Any, parents: list[Any]) -> None:
    p = dsub.add_parser("list", parents=parents, help="list the disks")
    p.set_defaults(func=cmd_disk_list)

    p = dsub.add_parser("info", parents=parents, help="show a disk, its chain and job")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_disk_info)

    p = dsub.add_parser("uri", parents=parents, help="print the NBD URI of a served disk")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_disk_uri)


# --- disk list / info ---------------------------------------------------------------------


def _disk_size(directory: str, disk: dict[str, Any]) -> int:
    if disk.get("size") is not None:
        return int(disk["size"])
    return int(qemu_img.info(os.path.join(directory, disk["top"]), force_share=True)
               ["virtual-size"])


def cmd_disk_list(args: argparse.Namespace) -> int:
    directory = datastore_dir(args)
    with service(args) as svc:
        served = is_served(svc)
        disks = svc.execute("query-disks", {})["disks"]
    for d in disks:
        if not d.get("error"):
            d["size"] = _disk_size(directory, d)
    lines = [f"{'NAME':20} {'SIZE':>10} {'IMAGES':>6}  {'JOB':12} TOP"
             + ("  URI" if served else "")]
    for d in disks:
        job = d.get("job")
        job_text = f"{job['id']}:{job['state']}" if job else "-"
        uri = f"  {_uri_text(d)}" if served else ""
        if d.get("error"):
            lines.append(f"{d['name']:20} {'?':>10} {'?':>6}  {job_text:12} {d['top']} "
                         f"(error: {d['error']}){uri}")
            continue
        lines.append(f"{d['name']:20} {human_bytes(d['size']):>10} {len(d['chain']):>6}  "
                     f"{job_text:12} {d['top']}{uri}")
    if not disks:
        lines = ["no disks"]
    emit(args, {"datastore": directory, "served": served, "disks": disks}, "\n".join(lines))
    return 0


def cmd_disk_info(args: argparse.Namespace) -> int:
    directory = datastore_dir(args)
    with service(args) as svc:
        served = is_served(svc)
        disk = svc.execute("query-disks", {"disk": args.name})["disks"][0]
    infos = qemu_img.info(os.path.join(directory, disk["top"]), backing_chain=True,
                          force_share=True)
    chain = []
    for info in infos:
        path = os.path.realpath(info["filename"])
        rel = os.path.relpath(path, directory)
        chain.append({"image": rel, "format": info["format"],
                      "virtual_size": int(info["virtual-size"]),
                      "actual_size": int(info.get("actual-size", 0)),
                      "backing": info.get("backing-filename")})
    disk["size"] = chain[0]["virtual_size"] if chain else _disk_size(directory, disk)
    out = {**disk, "served": served, "layers": chain}
    lines = [f"disk {disk['name']}: {human_bytes(disk['size'])}, "
             f"{'served on ' + _uri_text(disk) if served else 'not served'}",
             f"top: {disk['top']}", "chain (top first):"]
    for layer in chain:
        lines.append(f"  {layer['image']}  {layer['format']}  "
                     f"{human_bytes(layer['actual_size'])} on disk")
    job = disk.get("job")
    if job:
        lines.append(f"job {job['id']}: {job['kind']} {job['state']} into {job['target']}, "
                     f"copied {human_bytes(job.get('bytes_copied') or 0)} of "
                     f"{human_bytes(job.get('copy_set_bytes') or 0)}")
    else:
        lines.append("job: none")
    emit(args, out, "\n".join(lines))
    return 0


def _uri_text(disk: dict[str, Any]) -> str:
    w = disk.get("worker")
    if w is None:
        return "-"
    return disk["uri"] if w["state"] == "running" else \
        f"{disk['uri']} ({w['state']}{': ' + w['error'] if w['error'] else ''})"


def cmd_disk_uri(args: argparse.Namespace) -> int:
    directory = datastore_dir(args)
    with service(args) as svc:
        if not is_served(svc):
            raise CliError(f"datastore {directory} is not served ('vdisk serve -d "
                           f"{args.datastore}')")
        disk = svc.execute("query-disks", {"disk": args.name})["disks"][0]
    emit(args, {"disk": args.name, "uri": disk["uri"], "worker": disk["worker"]}, disk["uri"])
    return 0
