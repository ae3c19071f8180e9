"""Bad input: one line on stderr (``vdisk: error: ...``) and a non-zero exit code.

Usage errors (argparse) exit 2; a command that cannot be done exits 1.
"""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cliharness import REPO, Datastore, run_vdisk

import vdisk
from vdisk import cli, qemu_io
from vdisk.cli_common import parse_size
from vdisk.progress import ProgressBar, human_bytes, human_duration


@pytest.mark.parametrize("args, reason", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["disk", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["disk", "list"], "required: -d/--datastore"),
    (["disk", "create", "vm1", "--size", "10X", "-d", "/nonexistent"], "invalid size '10X'"),
    (["disk", "create", "vm1", "--size", "1000", "-d", "/nonexistent"], "multiple of 512"),
    (["disk", "create", "vm1", "--size", "0", "-d", "/nonexistent"], "must be positive"),
    (["job", "show", "x", "-d", "/nonexistent"], "invalid job id 'x'"),
    (["consolidate", "vm1", "--into", "a", "--to", "b", "-d", "/x"], "not allowed with"),
    (["serve", "-d", "/x", "--unix-dir", "r", "--ports", "1-2"], "not allowed with"),
    (["serve", "-d", "/x", "--ports", "99999"], "invalid port range"),
    (["serve", "frob", "-d", "/x"], "invalid choice: 'frob'"),
    (["backup", "vm1", "-d", "/x"], "required: --to"),
])
def test_usage_errors_exit_2_with_one_line(args: list[str], reason: str) -> None:
    result = run_vdisk(*args, check=False)
    assert result.returncode == 2
    assert reason in result.error_line()
    assert result.stdout == ""


def test_missing_datastore_directory(tmp_path: Path) -> None:
    result = run_vdisk("disk", "list", "-d", tmp_path / "nope", check=False)
    assert result.returncode == 1
    assert "no such datastore directory" in result.error_line()


def test_directory_that_is_not_a_datastore(tmp_path: Path) -> None:
    result = run_vdisk("snapshot", "vm1", "-d", tmp_path, check=False)
    assert result.returncode == 1
    assert "not a vdisk datastore" in result.error_line()


@pytest.mark.parametrize("command", [
    ["disk", "info", "vm9"],
    ["disk", "remove", "vm9"],
    ["snapshot", "vm9"],
    ["consolidate", "vm9"],
])
def test_unknown_disk(datastore: Datastore, command: list[str]) -> None:
    result = datastore.vdisk(*command, check=False)
    assert result.returncode == 1
    assert "disk 'vm9' does not exist" in result.error_line()


def test_unknown_job(datastore: Datastore) -> None:
    for action in ("show", "complete", "cancel", "resume"):
        result = datastore.vdisk("job", action, "42", check=False)
        assert result.returncode == 1
        assert "job 42 does not exist" in result.error_line()


def test_existing_disk_and_bad_name(datastore: Datastore) -> None:
    datastore.create("vm1")
    before = datastore.images()
    result = datastore.vdisk("disk", "create", "vm1", "--size", "1M", check=False)
    assert "disk 'vm1' already exists" in result.error_line()
    result = datastore.vdisk("disk", "create", "a/b", "--size", "1M", check=False)
    assert "invalid disk name 'a/b'" in result.error_line()
    assert datastore.images() == before


def test_backup_refuses_an_existing_file(datastore: Datastore, tmp_path: Path) -> None:
    datastore.create("vm1")
    existing = tmp_path / "backup.qcow2"
    existing.write_bytes(b"precious")
    result = datastore.vdisk("backup", "vm1", "--to", existing, check=False)
    assert result.returncode == 1
    assert "already exists" in result.error_line()
    assert existing.read_bytes() == b"precious"
    assert datastore.disk("vm1")["chain"] == [datastore.disk("vm1")["top"]]


def test_import_of_a_missing_file(datastore: Datastore, tmp_path: Path) -> None:
    result = datastore.vdisk("disk", "import", "vm1", tmp_path / "nope.qcow2", check=False)
    assert "no such file" in result.error_line()


def test_json_is_one_object(datastore: Datastore) -> None:
    datastore.create("vm1")
    for args in (["disk", "list"], ["disk", "info", "vm1"], ["job", "list"]):
        assert isinstance(datastore.json(*args), dict)


def test_console_script_entry_point() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["vdisk"] == "vdisk.cli:main"
    assert callable(cli.main)
    script = Path(sys.executable).parent / "vdisk"
    assert script.exists(), f"{script} is not installed (ci/install installs it)"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30,
                            check=True)
    assert result.stdout.strip() == f"vdisk {vdisk.__version__}"


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("65536") == 65536


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    with ProgressBar("job 1", 100 << 20, stream=quiet, interval=0) as bar:
        bar.update(50 << 20)
    assert quiet.getvalue() == ""

    tty = Terminal()
    with ProgressBar("job 1", 100 << 20, stream=tty, interval=0) as bar:
        bar.update(10 << 20)
        bar.update(50 << 20)
    text = tty.getvalue()
    assert "50.0 MiB / 100.0 MiB" in text and " 50%" in text and "/s" in text
    assert text.endswith("\n")

    tty = Terminal()
    with ProgressBar("job 1", 100, stream=tty, enabled=False) as bar:   # --json
        bar.update(50)
    assert tty.getvalue() == ""


def test_human_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_duration(75) == "1:15"
    assert human_duration(3725) == "1:02:05"


def test_no_arguments_print_the_usage() -> None:
    result = run_vdisk(check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: vdisk ")
    for command in ("datastore", "disk", "serve", "snapshot", "consolidate", "job", "backup",
                    "info", "replicate"):
        assert f"\n    {command} " in result.stderr, command
    assert result.stderr.splitlines()[-1] == \
        "vdisk: error: the following arguments are required: COMMAND"
    for command, action in (("job", "resume"), ("disk", "import"), ("datastore", "init"),
                            ("identity", "stamp")):
        result = run_vdisk(command, check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"usage: vdisk {command} ")
        assert f"\n    {action} " in result.stderr
        assert result.stderr.splitlines()[-1] == \
            "vdisk: error: the following arguments are required: ACTION"


def test_verbose_before_or_after_the_command(datastore: Datastore) -> None:
    datastore.create("vm1")
    for args in (["-v", "disk", "list", "-d", datastore.path],
                 ["disk", "list", "-d", datastore.path, "-v"],
                 ["disk", "list", "--verbose", "-d", datastore.path, "--json"]):
        result = run_vdisk(*args)
        assert "vdisk: vdisk.routing: " in result.stderr, args
    assert run_vdisk("disk", "list", "-d", datastore.path).stderr == ""


def test_disk_help_names_its_actions() -> None:
    for args in (["--help"], ["disk", "--help"]):
        assert "create, import, list, info and remove disks" in run_vdisk(*args).stdout


@pytest.mark.parametrize("args, code, reason", [
    (["bogus", "--json"], 2, "argument COMMAND: invalid choice: 'bogus' (choose from "),
    (["disk", "create", "vm1", "--size", "10X", "--json", "-d", "/x"], 2,
     "argument --size: invalid size '10X' (examples: 10G, 512M, 65536)"),
    (["disk", "list", "--js"], 2, "the following arguments are required: -d/--datastore"),
    (["disk", "list", "--json", "-d", "/nonexistent"], 1,
     "/nonexistent: no such datastore directory"),
])
def test_json_failures_print_an_error_object(args: list[str], code: int, reason: str) -> None:
    result = run_vdisk(*args, check=False)
    assert result.returncode == code
    assert result.error_line().startswith(reason)
    assert result.json() == {"error": result.error_line(), "code": code}


def test_json_failure_of_a_command_on_a_datastore(datastore: Datastore) -> None:
    result = datastore.vdisk("disk", "info", "vm9", "--json", check=False)
    assert result.json() == {"error": result.error_line(), "code": 1}
    assert result.error_line().endswith("disk 'vm9' does not exist")


def test_json_failure_of_a_job_reports_the_job(datastore: Datastore,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that fails: one object, the error with the job as it ended."""
    from vdisk_block import mirrorcopy
    from vdisk_block.disk import Disk

    datastore.create("vm1", "4M")
    datastore.vdisk("snapshot", "vm1")
    qemu_io.run(datastore.top("vm1"), "write -P 7 0 1M")

    def broken_read(*_args: Any) -> None:
        raise OSError(errno.EIO, "injected read error")

    # both ways the copy pass reads: under the disk lock, and outside it
    monkeypatch.setattr(Disk, "_read", broken_read)
    monkeypatch.setattr(mirrorcopy, "transfer", broken_read)
    codes: list[int] = []
    # in a thread: main() installs its SIGTERM handler only in the main thread
    thread = threading.Thread(target=lambda: codes.append(
        cli.main(["consolidate", "vm1", "-d", str(datastore.path), "--json"])))
    thread.start()
    thread.join(60)
    assert codes == [1]
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1, out.out
    obj = json.loads(lines[0])
    assert obj["code"] == 1 and obj["result"]["state"] == "failed"
    assert obj["error"].startswith(f"job {obj['result']['id']} failed: ")
    assert obj["error"].endswith("injected read error")
    assert out.err == f"vdisk: error: {obj['error']}\n"


def test_jobs_of_a_missing_disk(datastore: Datastore) -> None:
    result = datastore.vdisk("job", "list", "--disk", "nosuch", "--json", check=False)
    assert result.returncode == 1
    assert result.error_line() == f"{datastore.path}: disk 'nosuch' does not exist"
    assert result.json() == {"error": result.error_line(), "code": 1}


def test_cancel_of_a_finished_job(datastore: Datastore) -> None:
    datastore.create("vm1", "4M")
    datastore.vdisk("snapshot", "vm1")
    job = datastore.json("consolidate", "vm1")
    result = datastore.vdisk("job", "cancel", str(job["id"]), check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.error_line() == f"{datastore.path}: job {job['id']} is done: nothing to cancel"
