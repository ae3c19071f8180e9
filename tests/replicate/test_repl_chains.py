"""``vdisk replicate``: a chain rebuilt on a second datastore, shared layers linked.

An empty target gets every layer copied; disks sharing a base (linked clones)
or a middle layer replicated afterwards copy only what the target lacks and
link to the rest by content ID.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cliharness import CLI, run_vdisk
from replharness import (
    CLUSTER,
    COMMAND_TIMEOUT,
    Source,
    assert_chain_intact,
    assert_same_data,
    assert_totals,
    check_all,
    content_id,
    new_datastore,
    replicate,
    target_disk,
    visible_images,
)


def test_empty_target_gets_every_layer_copied(source: Source, target: Path) -> None:
    result = replicate("vm1", "-d", source.path, "--to", target)
    chain = [source.images[n] for n in ("vm1", "mid", "base")]
    assert [r["source"] for r in result["layers"]] == [str(p) for p in chain]
    assert [r["action"] for r in result["layers"]] == ["copied"] * 3
    assert (result["copied"], result["linked"]) == (3, 0)
    assert result["disk"] == "vm1" and result["snapshot"] is None
    assert result["verified"] is None
    assert result["target"] == str(target)
    assert_totals(result, target)
    for r, layer in zip(result["layers"], ("vm1", "mid", "base"), strict=True):
        # only the layer's own clusters move: its data plus a few metadata clusters
        assert source.data(layer) < r["bytes_moved"] <= source.data(layer) + 8 * CLUSTER, r
        # the copy keeps the layer's identity
        assert r["identity"] == "valid"
        assert r["content_id"] == content_id(source.images[layer]) \
            == content_id(target / r["image"])
        assert_same_data(source.images[layer], target / r["image"])

    disk = target_disk(target, "vm1")
    assert disk["top"] == result["top"]
    assert disk["chain"] == [result["top"], *(r["image"] for r in result["layers"])]
    assert len(visible_images(target)) == 4
    check_all(target)
    assert_same_data(source.top("vm1"), target / disk["top"])
    assert_chain_intact(target / disk["top"])


def test_shared_base_and_middle_are_linked(source: Source, target: Path) -> None:
    first = replicate("vm1", "-d", source.path, "--to", target)
    copies = {layer: r["image"] for layer, r in zip(("vm1", "mid", "base"), first["layers"],
                                                     strict=True)}

    # vm2 shares base: its top is copied, base linked
    second = replicate("vm2", "-d", source.path, "--to", target, "--verify")
    assert [(r["source"], r["action"]) for r in second["layers"]] == \
        [(str(source.images["vm2"]), "copied"), (str(source.images["base"]), "linked")]
    assert second["layers"][1]["image"] == copies["base"]
    assert (second["copied"], second["linked"]) == (1, 1)
    assert second["bytes_moved"] == second["layers"][0]["bytes_moved"]
    assert second["bytes_moved"] <= source.data("vm2") + 8 * CLUSTER
    assert second["verified"] is True and all(r["verified"] for r in second["layers"])
    assert_totals(second, target)

    # vm3 shares mid (and through it base): its top is copied, mid linked, the walk stops
    third = replicate("vm3", "-d", source.path, "--to", target, "--verify")
    assert [(r["source"], r["action"]) for r in third["layers"]] == \
        [(str(source.images["vm3"]), "copied"), (str(source.images["mid"]), "linked")]
    assert third["layers"][1]["image"] == copies["mid"]
    assert third["bytes_moved"] == third["layers"][0]["bytes_moved"]
    assert third["verified"] is True and all(r["verified"] for r in third["layers"])
    assert_totals(third, target)

    # one copy of each shared layer; 4 + 2 + 2 images
    assert len(visible_images(target)) == 8
    for layer in ("base", "mid"):
        cid = content_id(source.images[layer])
        assert [p.name for p in visible_images(target) if content_id(p) == cid] == \
            [Path(copies[layer]).name]
    check_all(target)
    for name in ("vm1", "vm2", "vm3"):
        disk = target_disk(target, name)
        assert_same_data(source.top(name), target / disk["top"])
        assert_chain_intact(target / disk["top"])
    assert target_disk(target, "vm2")["chain"][-1] == copies["base"]
    assert target_disk(target, "vm3")["chain"][-2:] == [copies["mid"], copies["base"]]


def test_replicate_an_image_without_disk(source: Source, target: Path) -> None:
    """IMAGE form: the frozen mid is copied, no disk is made; later vm3 links to it."""
    result = replicate(source.images["mid"], "--to", target)
    assert result["disk"] is None
    assert [r["action"] for r in result["layers"]] == ["copied", "copied"]
    assert result["top"] == result["layers"][0]["image"]
    assert_totals(result, target)
    assert_same_data(source.images["mid"], target / result["top"])
    assert run_list(target) == []
    linked = replicate("vm3", "-d", source.path, "--to", target)
    assert [r["action"] for r in linked["layers"]] == ["copied", "linked"]
    assert linked["layers"][1]["image"] == result["top"]
    assert_same_data(source.top("vm3"), target / linked["top"])


def run_list(target: Path) -> list[str]:
    return [d["name"] for d in run_vdisk("disk", "list", "-d", target, "--json")
            .json()["disks"]]


def test_concurrent_replicates_copy_a_shared_base_once(source: Source, target: Path) -> None:
    """Two replicates into one target at once: one copies base, the other links to it."""
    new_datastore(target)
    procs = [subprocess.Popen([*CLI, "replicate", name, "-d", str(source.path), "--to",
                               str(target), "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for name in ("vm1", "vm2")]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=COMMAND_TIMEOUT)
            assert p.returncode == 0, err
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    results = [json.loads(o) for o in outs]
    base = str(source.images["base"])
    actions = sorted(r["action"] for res in results for r in res["layers"]
                     if r["source"] == base)
    assert actions == ["copied", "linked"], results
    cid = content_id(source.images["base"])
    assert sum(content_id(p) == cid for p in visible_images(target)) == 1
    check_all(target)
    for name in ("vm1", "vm2"):
        assert_same_data(source.top(name), target / target_disk(target, name)["top"])


def test_several_disks_in_one_command(source: Source, target: Path) -> None:
    """vm1 vm2 vm3 one after another: the base and mid are copied once (for vm1),
    then linked; one JSON object holds each disk's result and the totals."""
    out = replicate("vm1", "vm2", "vm3", "-d", source.path, "--to", target)
    results = out["results"]
    assert [r["disk"] for r in results] == ["vm1", "vm2", "vm3"]
    assert [(r["copied"], r["linked"]) for r in results] == [(3, 0), (1, 1), (1, 1)]
    for key in ("copied", "linked", "bytes_moved"):
        assert out[key] == sum(r[key] for r in results)
    for r in results:
        assert_totals(r, target)
        assert_same_data(source.top(r["disk"]), target / r["top"])
    check_all(target)
    # every disk named must exist before anything is copied
    again = run_vdisk("replicate", "vm1", "nosuch", "-d", source.path, "--to",
                      target.parent / "other", check=False)
    assert again.returncode == 1 and "nosuch" in again.stderr
    assert not (target.parent / "other").exists()
    # --name names one disk only
    bad = run_vdisk("replicate", "vm1", "vm2", "-d", source.path, "--to",
                    target.parent / "other", "--name", "x", check=False)
    assert bad.returncode == 1 and "--name names one disk" in bad.stderr
    assert not (target.parent / "other").exists()
