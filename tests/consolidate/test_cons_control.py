"""The control socket answers every line, bad ones with an error, and carries on.

Each bad request gets exactly one error reply of the documented class
(docs/control.md); afterwards the same connection, a new connection and the
NBD exports all still work, and nothing changed on the disk.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable

import pytest
from cons_control import ControlClient
from cons_datastore import LayeredDisk, ServedDatastore, read_export

BAD_LINES: list[tuple[bytes, str]] = [
    (b"{not json", "ParseError"),
    (b'{"execute": "query-disk"', "ParseError"),
    (b"\xff\xfe\x00garbage", "ParseError"),
    (b"[1, 2, 3]", "ParseError"),
    (b'"query-disk"', "ParseError"),
    (b"42", "ParseError"),
    (b"null", "ParseError"),
    (b"{}", "ParseError"),
    (b'{"arguments": {}}', "ParseError"),
    (b'{"execute": 5}', "ParseError"),
    (b'{"execute": ["query-disk"]}', "ParseError"),
    (b'{"execute": "no-such-command"}', "CommandNotFound"),
    (b'{"execute": "__init__"}', "CommandNotFound"),
    (b'{"execute": "query-disk", "arguments": [1]}', "GenericError"),
    (b'{"execute": "query-disk", "arguments": "a"}', "GenericError"),
]

# (command, arguments): missing, extra and wrongly typed arguments
BAD_ARGUMENTS: list[tuple[str, dict[str, object]]] = [
    ("snapshot", {}),
    ("snapshot", {"disk": "a", "extra": 1}),
    ("snapshot", {"disk": "nosuchdisk"}),
    ("snapshot", {"disk": 5}),
    ("snapshot", {"disk": ["a"]}),
    ("snapshot", {"disk": {"name": "a"}}),
    ("snapshot", {"disk": None}),
    ("consolidate", {}),
    ("consolidate", {"disk": "a", "bogus": True}),
    ("consolidate", {"disk": "a", "into": 3}),
    ("consolidate", {"disk": "a", "to": ["x"]}),
    ("consolidate", {"disk": "a", "to": "../outside.qcow2"}),
    ("consolidate", {"disk": "a", "to": "images/a-1.qcow2"}),
    ("consolidate", {"disk": "a", "into": "images/a-2.qcow2"}),
    ("consolidate", {"disk": "a", "into": "images/nonexistent.qcow2"}),
    ("query-disk", {"disk": 7}),
    ("query-disk", {"disk": "nosuchdisk"}),
    ("query-disk", {"bogus": 1}),
    ("query-jobs", {"id": "x"}),
    ("query-jobs", {"id": 1.5}),
    ("query-jobs", {"disk": ["a"]}),
    ("job-complete", {}),
    ("job-complete", {"id": 999}),
    ("job-complete", {"id": "1"}),
    ("job-cancel", {"id": None}),
    ("job-cancel", {"id": True}),
    ("job-resume", {"id": 999}),
    ("job-resume", {"id": {}}),
    ("flush", {"disk": "b"}),                  # another disk: not this worker's
]


def send_line(ctl: ControlClient, line: bytes) -> dict[str, object]:
    return ctl.send_raw(line + b"\n", deadline=10)


def test_socket_mode_and_greeting(disk_a: LayeredDisk,
                                  serve_ds: Callable[..., ServedDatastore]) -> None:
    served = serve_ds(disk_a.ds)
    st = os.stat(served.control)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    ctl = served.client()
    assert ctl.greeting["vdisk"]["datastore"] == str(disk_a.ds.dir), ctl.greeting
    assert "version" in ctl.greeting["vdisk"]
    rep = ctl.call("query-disk", {}, id=7)
    assert rep.get("id") == 7 and "return" in rep, rep
    rep = ctl.call("no-such-command", id="x")
    assert rep.get("id") == "x" and rep["error"]["class"] == "CommandNotFound", rep


def test_malformed_lines(disk_a: LayeredDisk,
                         serve_ds: Callable[..., ServedDatastore]) -> None:
    served = serve_ds(disk_a.ds)
    ctl = served.client()
    wrong = []
    for line, cls in BAD_LINES:
        rep = send_line(ctl, line)
        if rep.get("error", {}).get("class") != cls:        # type: ignore[union-attr]
            wrong.append(f"{line!r}: expected {cls}, got {rep}")
    # several requests in one write, and blank lines, each answered in order
    replies = [ctl.send_raw(b'{"execute": "query-disk", "id": 1}\n\n   \n'
                            b'{"execute": "nope", "id": 2}\n')]
    replies.append(ctl.reply())
    assert [r.get("id") for r in replies] == [1, 2], replies
    assert not wrong, "\n".join(wrong)
    assert_still_serving(served, disk_a, ctl)


def test_bad_arguments(disk_a: LayeredDisk,
                       serve_ds: Callable[..., ServedDatastore]) -> None:
    served = serve_ds(disk_a.ds)
    ctl = served.client()
    read_export(served.socket, "a", len(disk_a.initial))    # disk "a" is open from now on
    wrong = []
    for command, args in BAD_ARGUMENTS:
        rep = ctl.call(command, args, deadline=10)
        err = rep.get("error")
        if not isinstance(err, dict) or err.get("class") != "GenericError":
            wrong.append(f"{command} {json.dumps(args)}: expected a GenericError, got {rep}")
        live = [j for j in ctl.execute("query-jobs")["jobs"]
                if j["state"] not in ("failed", "cancelled", "done")]
        for j in live:                     # a wrongly accepted job: undo, to go on testing
            wrong.append(f"  ... and it started job {j['id']} ({j['state']})")
            ctl.execute("job-cancel", id=j["id"])
    assert_still_serving(served, disk_a, ctl)
    assert not wrong, "\n".join(wrong)


def test_long_line_and_abrupt_clients(disk_a: LayeredDisk,
                                      serve_ds: Callable[..., ServedDatastore]) -> None:
    served = serve_ds(disk_a.ds)
    # a line longer than the server's limit (1 MiB) gets an error, then the close
    ctl = served.client()
    try:
        ctl.sock.sendall(b"x" * (2 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass                     # the server may close before it read everything
    rep = ctl.reply(deadline=10)
    assert rep.get("error", {}).get("class") == "ParseError", rep
    # clients that go away mid-line, mid-command, or without reading
    for payload in (b"", b'{"execute": "query-di', b'{"execute": "query-disk"}\n' * 50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(served.control))
        s.sendall(payload)
        s.close()
    assert_still_serving(served, disk_a, served.client())


def assert_still_serving(served: ServedDatastore, disk: LayeredDisk,
                         ctl: ControlClient) -> None:
    chain = [f"images/a-{i}.qcow2" for i in (2, 1, 0)]
    assert ctl.disk("a")["chain"] == chain
    with served.client() as other:
        assert other.disk("a")["chain"] == chain
    assert read_export(served.socket, "a", len(disk.initial)) == disk.initial
    assert served.server.returncode is None
    assert set(disk.ds.image_files()) == set(disk.chain)


@pytest.mark.parametrize("command", ["snapshot", "consolidate"])
def test_commands_on_a_disk_with_a_job_are_refused(
        disk_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], command: str) -> None:
    served = serve_ds(disk_a.ds)
    ctl = served.client()
    job = ctl.execute("consolidate", disk="a", pivot=False)["job"]
    assert ctl.wait_job(job["id"], ("ready",))["state"] == "ready"
    rep = ctl.call(command, {"disk": "a"})
    assert rep.get("error", {}).get("class") == "GenericError", rep
    assert ctl.job(job["id"])["state"] == "ready"
    ctl.execute("job-cancel", id=job["id"])
    assert_still_serving(served, disk_a, ctl)


@pytest.mark.parametrize("pivot", ["false", "no"])
def test_consolidate_pivot_must_be_a_boolean(
        disk_a: LayeredDisk, serve_ds: Callable[..., ServedDatastore], pivot: object) -> None:
    served = serve_ds(disk_a.ds)
    ctl = served.client()
    rep = ctl.call("consolidate", {"disk": "a", "pivot": pivot})
    jobs = ctl.execute("query-jobs")["jobs"]
    for j in jobs:
        if j["state"] in ("copying", "ready"):
            ctl.execute("job-cancel", id=j["id"])
    assert rep.get("error", {}).get("class") == "GenericError", \
        f"pivot={pivot!r} was accepted: {rep}; jobs {[(j['state'], j['top_after']) for j in jobs]}"
    assert jobs == []
    assert_still_serving(served, disk_a, ctl)
