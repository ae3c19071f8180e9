"""Differential test of the jobs on a served datastore, on random chains.

The served twin of test_jobs_engine.py (:mod:`jobserved`): nbdkit serves a
datastore whose disk is a random chain built by QEMU, two libnbd connections
write while the job runs through the control socket (or as ``vdisk backup``
and ``vdisk replicate``), and every step is checked through NBD and, with the
server stopped, by QEMU. Each example starts nbdkit twice, so there are fewer
of them than engine examples; ``VDISK_JOBS_SCALE`` multiplies the counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jobcheck import count
from jobengine import KINDS, PARALLEL_KINDS, plans
from jobserved import ServedCase, make_datastore
from jobshapes import shapes
from test_jobs_engine import job_settings

pytestmark = [pytest.mark.differential, pytest.mark.slow]

SCALE = float(os.environ.get("VDISK_JOBS_SCALE", "1"))
EXAMPLES = max(1, int(4 * SCALE))
PARALLEL_EXAMPLES = max(1, int(3 * SCALE))


def run_cases(kind: str, parallel: bool, n: int,
              tmp_path_factory: pytest.TempPathFactory) -> None:
    key = f"served {kind}{' parallel' if parallel else ''}"

    @job_settings(n)
    @given(spec=shapes(qcow2_only=kind == "replicate"), data=st.data())
    def case(spec, data) -> None:  # noqa: ANN001 - hypothesis arguments
        plan = data.draw(plans(kind, spec.depth, parallel), label="plan")
        if plan.new and spec.depth + plan.snapshots_first < 2:
            plan.snapshots_first += 1       # --to replaces two layers at least
        workdir: Path = tmp_path_factory.mktemp("srv")
        ds, built = make_datastore(spec, workdir)
        count(key)
        ServedCase(built, ds, plan, workdir).run()

    case()


@pytest.mark.parametrize("kind", KINDS)
def test_served_job(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    run_cases(kind, False, EXAMPLES, tmp_path_factory)


@pytest.mark.parametrize("kind", PARALLEL_KINDS)
def test_served_job_parallel(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    run_cases(kind, True, PARALLEL_EXAMPLES, tmp_path_factory)
