"""``vdisk replicate`` of a disk that is being served: it snapshots the disk first and
copies the frozen image, so the target gets what the client wrote before."""

from __future__ import annotations

from pathlib import Path

from cliharness import Datastore, MiB, Serve, connect
from nbdharness import pattern, read_all
from replharness import (
    Source,
    assert_chain_intact,
    assert_same_data,
    assert_totals,
    check_all,
    replicate,
    target_disk,
)


def test_served_disk_is_snapshotted_and_copied(source: Source, target: Path,
                                               serve_ds: Serve) -> None:
    served = serve_ds(source.ds)
    written = pattern(42, 2 * MiB)
    with connect(served.uri("vm2")) as h:
        h.pwrite(written, 5 * MiB)
        h.flush()
        chain_before = source.ds.disk("vm2")["chain"]

        result = replicate("vm2", "-d", source.path, "--to", target, "--verify")
        snap = result["snapshot"]
        assert snap is not None and snap["disk"] == "vm2"
        assert snap["frozen"] == chain_before[0]
        assert result["layers"][0]["source"] == str(source.path / snap["frozen"])
        assert result["verified"] is True
        # the client goes on writing into the new top; the copy does not change
        h.pwrite(pattern(43, MiB), 5 * MiB)
        h.flush()
        expected = bytearray(read_all(h))
    assert source.ds.disk("vm2")["chain"] == [snap["top"], *chain_before]

    assert_totals(result, target)
    check_all(target)
    top = target / target_disk(target, "vm2")["top"]
    assert_same_data(source.path / snap["frozen"], top)
    assert_chain_intact(top)
    expected[5 * MiB:6 * MiB] = written[:MiB]        # what the copy must hold
    served_target = serve_ds(Datastore(target))
    with connect(served_target.uri("vm2")) as t:
        assert read_all(t) == bytes(expected)


def test_served_disk_replicated_again_copies_only_the_new_delta(
        source: Source, target: Path, serve_ds: Serve) -> None:
    served = serve_ds(source.ds)
    with connect(served.uri("vm1")) as h:
        h.pwrite(pattern(50, MiB), 20 * MiB)
        h.flush()
        first = replicate("vm1", "-d", source.path, "--to", target)
        h.pwrite(pattern(51, MiB), 21 * MiB)
        h.flush()
        second = replicate("vm1", "-d", source.path, "--to", target, "--name", "vm1-later")
        final = read_all(h)
    assert [r["action"] for r in first["layers"]] == ["copied"] * 3
    # the frozen image the first run copied is on the target: the walk stops there
    assert [r["action"] for r in second["layers"]] == ["copied", "linked"]
    assert second["layers"][1]["image"] == first["layers"][0]["image"]
    assert second["bytes_moved"] == second["layers"][0]["bytes_moved"]
    assert_totals(second, target)
    top = target / target_disk(target, "vm1-later")["top"]
    assert_same_data(source.path / second["snapshot"]["frozen"], top)
    served_target = serve_ds(Datastore(target))
    with connect(served_target.uri("vm1-later")) as t:
        assert read_all(t) == final
