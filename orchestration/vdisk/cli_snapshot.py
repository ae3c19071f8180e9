"""``vdisk snapshot``: take, list, revert and delete a disk's snapshots.

    vdisk snapshot DISK [--name NAME] -d DIR        (or: snapshot create DISK ...)
    vdisk snapshot list DISK -d DIR
    vdisk snapshot revert DISK NAME [--force] -d DIR
    vdisk snapshot delete DISK NAME -d DIR

A snapshot freezes the disk's top under a new empty one; a name (``--name``)
makes it a named snapshot: the frozen image, which holds the disk as it was,
is kept under that name until it is deleted, and no consolidation merges it
away (plugin/vdisk_block/snapshots.py). An unnamed snapshot's layer is an
ordinary one: `vdisk consolidate` merges it. Reverting puts a new empty top on a
snapshot's image; deleting merges what sits above the image into it by an
online consolidation, which this command follows to its end. A disk named
like an action is reached with the explicit ``snapshot create``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .cli_common import (
    CliError,
    Parser,
    UsageError,
    control_options,
    datastore_options,
    emit,
    output_options,
    service,
)
from .cli_jobs import STALL_TIMEOUT_S, follow_or_explain, job_summary
from .progress import human_bytes

ACTIONS = {"create": 1, "list": 1, "revert": 2, "delete": 2}


def add_parsers(sub: Any) -> None:
    wait = Parser(add_help=False)
    wait.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S, metavar="SECONDS",
                      help="give up waiting when a deletion's merge makes no progress this long")
    p = sub.add_parser("snapshot", parents=[output_options(), datastore_options(),
                                            control_options(), wait],
                       help="take, list, revert or delete a disk's snapshots",
                       description="vdisk snapshot DISK [--name NAME] | snapshot list DISK | "
                       "snapshot revert DISK NAME [--force] | snapshot delete DISK NAME")
    p.add_argument("words", nargs="+", metavar="[ACTION] DISK [NAME]",
                   help="ACTION: create (the default), list, revert or delete")
    p.add_argument("--name", help="name the snapshot (`snapshot list` shows named ones; "
                                  "a consolidation never merges them away)")
    p.add_argument("--force", action="store_true",
                   help="revert although read-only clients are attached (they read the "
                        "snapshot's data from their next request on)")
    p.set_defaults(func=cmd_snapshot)


def _parse(words: list[str]) -> tuple[str, list[str]]:
    if words[0] in ACTIONS and len(words) > 1:
        action, rest = words[0], words[1:]
    else:
        action, rest = "create", words
    if len(rest) != ACTIONS[action]:
        want = "DISK" if ACTIONS[action] == 1 else "DISK NAME"
        raise UsageError(f"snapshot {action}: expected {want}, got {' '.join(rest) or 'nothing'}")
    return action, rest


def cmd_snapshot(args: argparse.Namespace) -> int:
    action, rest = _parse(args.words)
    if args.name is not None and action != "create":
        raise UsageError(f"snapshot {action}: --name is for taking a snapshot")
    if args.force and action != "revert":
        raise UsageError(f"snapshot {action}: --force is for revert")
    disk = rest[0]
    with service(args) as svc:
        if action == "create":
            arguments: dict[str, Any] = {"disk": disk}
            if args.name:
                arguments["name"] = args.name
            out = svc.execute("snapshot", arguments)
            named = f", snapshot {out['name']}" if out["name"] else ""
            emit(args, out, f"{disk}: new top {out['top']} (frozen {out['frozen']}{named})")
        elif action == "list":
            out = svc.execute("snapshot-list", {"disk": disk})
            emit(args, out, _table(out["snapshots"]))
        elif action == "revert":
            out = svc.execute("snapshot-revert", {"disk": disk, "name": rest[1],
                                                  "force": bool(args.force)})
            emit(args, out, f"{disk}: reverted to snapshot {rest[1]}; new top {out['top']}"
                            + (f"; deleted {', '.join(out['dropped'])}" if out["dropped"] else ""))
        else:
            out = svc.execute("snapshot-delete", {"disk": disk, "name": rest[1]})
            text = f"{disk}: snapshot {rest[1]} deleted"
            if out["job"] is not None:
                out["job"] = job = follow_or_explain(svc, out["job"], args, until_ready=False)
                text += f"; its layer merged by {job_summary(job)}"
            elif out["dropped"]:
                text += f"; deleted {', '.join(out['dropped'])}"
            emit(args, out, text)
            if out["job"] is not None and out["job"]["state"] != "done":
                raise CliError(f"snapshot {rest[1]} is deleted, but merging its layer "
                               f"{out['job']['state']}: {out['job'].get('error') or '?'}")
    return 0


def _table(snaps: list[dict[str, Any]]) -> str:
    if not snaps:
        return "no snapshots"
    lines = [f"{'NAME':24} {'CREATED':19} {'SIZE':>10} {'ON DISK':>10}  IMAGE"]
    for s in snaps:
        mark = " (current)" if s["current"] else "" if s["in_chain"] else " (off the chain)"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
        lines.append(f"{s['name']:24} {created:19} {human_bytes(s['virtual_size']):>10} "
                     f"{human_bytes(s['bytes']):>10}  {s['image']}{mark}")
    return "\n".join(lines)
