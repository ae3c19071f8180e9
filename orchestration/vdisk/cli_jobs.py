"""``vdisk snapshot``, ``consolidate``, ``job ...`` and ``backup``.

All of them go through the datastore's service (docs/control.md): the
server's, over its control socket, when the datastore is served, otherwise
one in this process. An in-process job lives only as long as the command, so
offline a consolidation always runs to its pivot (``--no-pivot`` needs a
server), and the command waits for it. Waiting polls ``query-jobs`` every
``POLL_S`` and gives up when the job has made no progress for
``--stall-timeout`` seconds (served, the job then keeps running).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time
from typing import Any

from . import qemu_img
from .cli_common import (
    IMAGE_RULE,
    CliError,
    Parser,
    control_options,
    datastore_dir,
    datastore_image,
    datastore_options,
    emit,
    fail_with,
    job_id,
    one_line,
    output_options,
    service,
)
from .control import Service
from .errors import Error
from .progress import ProgressBar, human_bytes
from .routing import is_served

POLL_S = 0.2
STALL_TIMEOUT_S = 300.0
END_STATES = ("done", "failed", "cancelled", "interrupted")


class JobInterrupted(CliError):
    """The user interrupted the wait (Ctrl-C)."""


def add_parsers(sub: Any) -> None:
    out, ds, ctl = output_options(), datastore_options(), control_options()
    wait = Parser(add_help=False)
    wait.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S, metavar="SECONDS",
                      help="give up waiting when the job makes no progress for this long")

    p = sub.add_parser("consolidate", parents=[out, ds, ctl, wait],
                       help="collapse a disk's top into an image below it, online")
    p.add_argument("disk", metavar="DISK")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--into", metavar="IMAGE",
                        help="an image of the chain (default: the top's backing file): "
                             + IMAGE_RULE)
    target.add_argument("--to", metavar="NEWFILE",
                        help="a new image of the datastore on the backing file's backing: "
                             + IMAGE_RULE)
    p.add_argument("--no-pivot", action="store_true",
                   help="stop at ready, keeping the target in sync, until 'vdisk job "
                        "complete' or 'cancel' (served datastores only)")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("job", help="list, show, complete, cancel or resume jobs")
    jsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = jsub.add_parser("list", parents=[out, ds, ctl], help="list the jobs, newest first")
    p.add_argument("--disk", help="only this disk's jobs")
    p.set_defaults(func=cmd_job_list)
    for action, helptext, parents in (
            ("show", "show a job", [out, ds, ctl]),
            ("complete", "pivot a ready job", [out, ds, ctl]),
            ("cancel", "cancel a job, or roll back an interrupted one", [out, ds, ctl]),
            ("resume", "run an interrupted job again", [out, ds, ctl, wait])):
        p = jsub.add_parser(action, parents=parents, help=helptext)
        p.add_argument("id", metavar="ID", type=job_id)
        p.set_defaults(func=cmd_job_action)

    p = sub.add_parser("backup", parents=[out, ds, ctl, wait],
                       help="back up a live disk: snapshot, copy, consolidate")
    p.add_argument("disk", metavar="DISK")
    p.add_argument("--to", required=True, metavar="FILE|DIR",
                   help="the backup: a new qcow2 file, or an existing directory (or a path "
                        "ending in '/') to put DISK-<timestamp>.qcow2 in; relative to the "
                        "current directory")
    p.set_defaults(func=cmd_backup)


# --- job display and waiting ------------------------------------------------------------


def job_summary(job: dict[str, Any]) -> str:
    copied = job.get("bytes_copied") or 0
    line = (f"job {job['id']} ({job['kind']} {job['disk']}): {job['state']}; copied "
            f"{human_bytes(copied)} of a {human_bytes(job.get('copy_set_bytes') or 0)} copy "
            f"set in {job.get('passes') or 0} pass(es), mirrored "
            f"{human_bytes(job.get('bytes_mirrored') or 0)}")
    if job.get("bytes_direct"):
        line += f" ({human_bytes(job['bytes_direct'])} to the target alone)"
    if job["state"] == "done":
        line += (f", {job.get('duration_s') or 0:.2f} s, pivot pause "
                 f"{job.get('pivot_pause_ms') or 0:.1f} ms; top {job.get('top_before')} -> "
                 f"{job.get('top_after')}")
    elif job.get("target"):
        line += f"; target {job['target']}"
    if job.get("error"):
        line += f"; error: {job['error']}"
    return line


def query_job(svc: Service, ident: int) -> dict[str, Any]:
    jobs = svc.execute("query-jobs", {"id": ident})["jobs"]
    if not jobs:
        raise CliError(f"job {ident} does not exist")
    job: dict[str, Any] = jobs[0]
    return job


def follow(svc: Service, job: dict[str, Any], *, until_ready: bool, show_progress: bool,
           stall_timeout: float) -> dict[str, Any]:
    """Poll a job until it ends (or is ready, with until_ready); bounded by stall_timeout."""
    ident = int(job["id"])
    last_key: tuple[Any, ...] = ()
    last_change = time.monotonic()
    with ProgressBar(f"job {ident}", int(job.get("copy_set_bytes") or 0),
                     enabled=show_progress) as bar:
        while True:
            key = (job["state"], job.get("bytes_copied"), job.get("bytes_mirrored"))
            now = time.monotonic()
            if key != last_key:
                last_key, last_change = key, now
            bar.update(int(job.get("bytes_copied") or 0), int(job.get("copy_set_bytes") or 0),
                       label=f"job {ident} {job['state']}")
            if job["state"] in END_STATES or (until_ready and job["state"] == "ready"):
                return job
            if now - last_change > stall_timeout:
                where = ("it keeps running on the server" if is_served(svc)
                         else "it is cancelled")
                raise CliError(f"job {ident} made no progress for {stall_timeout:g} s "
                               f"({job['state']}); {where}")
            time.sleep(POLL_S)
            job = query_job(svc, ident)


def settled(svc: Service, job: dict[str, Any]) -> dict[str, Any]:
    """The job as the journal records it once its pivot is complete.

    A job shows ``done`` as soon as the disk serves the target, a moment
    before the service has deleted the dropped images and journaled the end;
    ``job-complete`` returns after that (docs/control.md), so it is the way to
    wait for it (an in-process service must not be closed before).
    """
    from vdisk_block.errors import ImageError

    if job["state"] != "done":
        return job
    try:
        done: dict[str, Any] = svc.execute("job-complete", {"id": job["id"]})["job"]
    except (Error, ImageError):
        return query_job(svc, int(job["id"]))
    return done


def follow_or_explain(svc: Service, job: dict[str, Any], args: argparse.Namespace, *,
                      until_ready: bool) -> dict[str, Any]:
    try:
        return settled(svc, follow(svc, job, until_ready=until_ready,
                                   show_progress=not args.json,
                                   stall_timeout=args.stall_timeout))
    except KeyboardInterrupt:
        if is_served(svc):
            raise JobInterrupted(f"interrupted; job {job['id']} keeps running on the server "
                                 f"(vdisk job show {job['id']} -d {args.datastore})") from None
        from vdisk_block.errors import ImageError

        try:                            # offline, the job lives in this process
            svc.execute("job-cancel", {"id": job["id"]})
            outcome = "is cancelled"
        except (Error, ImageError):     # too late: its pivot is under way or done
            outcome = "had already pivoted; it finishes"
        raise JobInterrupted(f"interrupted; job {job['id']} {outcome}") from None


def finish(args: argparse.Namespace, job: dict[str, Any], text: str | None = None) -> int:
    if job["state"] in ("failed", "interrupted", "cancelled"):
        fail_with(args, job, text or job_summary(job),
                  f"job {job['id']} {job['state']}: {job.get('error') or 'no reason given'}")
    emit(args, job, text or job_summary(job))
    return 0


# --- snapshot / consolidate ------------------------------------------------------------------


def consolidate(svc: Service, args: argparse.Namespace, arguments: dict[str, Any],
                pivot: bool) -> dict[str, Any]:
    if not pivot and not is_served(svc):
        raise CliError("--no-pivot needs a served datastore: offline, the job cannot "
                       "outlive this command")
    job: dict[str, Any] = svc.execute("consolidate", {**arguments, "pivot": pivot})["job"]
    return follow_or_explain(svc, job, args, until_ready=not pivot)


def cmd_consolidate(args: argparse.Namespace) -> int:
    directory = datastore_dir(args)
    arguments: dict[str, Any] = {"disk": args.disk}
    if args.into:
        arguments["into"] = datastore_image(directory, args.into)[1]
    if args.to:
        arguments["to"] = datastore_image(directory, args.to, exists=False)[1]
    with service(args) as svc:
        job = consolidate(svc, args, arguments, pivot=not args.no_pivot)
    text = None
    if job["state"] == "ready":
        text = (f"{job_summary(job)}\nthe target stays in sync; finish with 'vdisk job "
                f"complete {job['id']} -d {args.datastore}' (or 'job cancel')")
    return finish(args, job, text)


# --- job ... -------------------------------------------------------------------------------


def cmd_job_list(args: argparse.Namespace) -> int:
    arguments = {"disk": args.disk} if args.disk else {}
    with service(args) as svc:
        jobs = svc.execute("query-jobs", arguments)["jobs"]
    lines = [f"{'ID':>4} {'DISK':16} {'STATE':12} {'COPIED':>10} {'COPY SET':>10}  TARGET"]
    for j in jobs:
        lines.append(f"{j['id']:>4} {j['disk']:16} {j['state']:12} "
                     f"{human_bytes(j.get('bytes_copied') or 0):>10} "
                     f"{human_bytes(j.get('copy_set_bytes') or 0):>10}  {j.get('target')}")
    emit(args, {"jobs": jobs}, "\n".join(lines) if jobs else "no jobs")
    return 0


def cmd_job_action(args: argparse.Namespace) -> int:
    with service(args) as svc:
        if args.action == "show":
            job = query_job(svc, args.id)
            emit(args, job, job_summary(job))
            return 0
        job = svc.execute(f"job-{args.action}", {"id": args.id})["job"]
        if args.action == "resume":
            job = follow_or_explain(svc, job, args, until_ready=False)
    if args.action == "cancel":
        emit(args, job, job_summary(job))
        return 0
    return finish(args, job)


# --- backup ----------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    """Snapshot; copy the frozen chain to a standalone qcow2; consolidate the delta back.

    The backup is a job of the disk from its snapshot to the end of the copy
    (backup-begin / backup-end, journalled under this command's owner token):
    meanwhile no other job can start on the disk, so nothing writes the frozen
    layers it reads, and qemu-img reads them under QEMU's read locks. If this
    command dies, its job is found dead and its temporary copy removed.
    """
    from vdisk_block.files import rename_noreplace
    from vdisk_block.owner import Owner

    directory = datastore_dir(args)
    dest = backup_destination(args.to, args.disk)
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{os.getpid()}.tmp")
    t0 = time.monotonic()
    with service(args) as svc, Owner(directory, f"vdisk backup {args.disk}") as me:
        begun = svc.execute("backup-begin", {"disk": args.disk, "owner": me.token,
                                             "output": dest, "temp": tmp})
        snap = {"disk": args.disk, "top": begun["top"], "frozen": begun["frozen"]}
        copy_error: BaseException | None = None
        try:
            qemu_img.run(["convert", "-q", "-O", "qcow2",
                          os.path.join(directory, snap["frozen"]), tmp])
            _sync(tmp)
            rename_noreplace(tmp, dest)
            _sync(os.path.dirname(dest))
        except BaseException as e:      # consolidate back first, then report
            copy_error = e
            if isinstance(e, FileExistsError):
                copy_error = CliError(f"{dest} appeared while the backup was written")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        end: dict[str, Any] = {"id": begun["job"]["id"], "owner": me.token}
        if copy_error is not None:
            end["error"] = "interrupted" if isinstance(copy_error, KeyboardInterrupt) \
                else one_line(str(copy_error))
        else:
            end["bytes"] = os.stat(dest).st_size
        svc.execute("backup-end", end)
        try:
            job = consolidate(svc, args, {"disk": args.disk, "into": snap["frozen"]},
                              pivot=True)
        except BaseException as e:
            if copy_error is not None:
                raise copy_error from None
            merge = f"'vdisk consolidate {args.disk} --into {snap['frozen']}' merges it"
            if isinstance(e, (KeyboardInterrupt, JobInterrupted)):
                raise JobInterrupted(f"interrupted; backup {dest} is complete, its snapshot "
                                     f"{snap['frozen']} stays in the chain ({merge})") from e
            raise CliError(f"backup {dest} is complete, but consolidating the snapshot "
                           f"back failed: {one_line(str(e)) or type(e).__name__} "
                           f"({merge})") from None
        if copy_error is not None:
            raise copy_error
    info = qemu_img.info(dest)
    result = {"disk": args.disk, "backup": dest, "bytes": os.stat(dest).st_size,
              "virtual_size": int(info["virtual-size"]), "snapshot": snap,
              "job": begun["job"]["id"], "duration_s": time.monotonic() - t0,
              "consolidate": job}
    text = (f"backed up {args.disk} to {dest} ({human_bytes(result['bytes'])}, snapshot "
            f"{snap['frozen']})\n{job_summary(job)}")
    if job["state"] != "done":
        fail_with(args, result, text, f"backup {dest} is complete, but consolidating the "
                  f"snapshot back {job['state']}: {job.get('error') or 'no reason given'}")
    emit(args, result, text)
    return 0


def backup_destination(given: str, disk: str) -> str:
    """The backup's absolute path: ``--to FILE``, a new file in an existing
    directory; or ``--to DIR`` (an existing directory, or any path ending in
    ``/``, which must then be one): a new file ``DISK-<timestamp>.qcow2`` in it."""
    path = os.path.abspath(given)
    if given.endswith(os.sep) or os.path.isdir(path):
        if not os.path.isdir(path):
            raise CliError(f"{given}: no such directory")
        stem = f"{disk.replace(os.sep, '_')}-{time.strftime('%Y%m%dT%H%M%S')}"
        names = (f"{stem}{f'-{n}' if n else ''}.qcow2" for n in itertools.count())
        return next(p for p in (os.path.join(path, n) for n in names) if not os.path.lexists(p))
    if os.path.lexists(path):
        raise CliError(f"{given} already exists")
    if not os.path.isdir(os.path.dirname(path)):
        raise CliError(f"{os.path.dirname(given)}: no such directory")
    return path


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
