"""Differential test of the jobs through the engine API, on random chains.

Each example builds a random chain with QEMU (:mod:`jobshapes`), opens it with
the engine, and runs one job kind while guest threads write (:mod:`jobengine`):
the guest view equals the model while the job copies, when it is ready, after
the pivot and after reopening; ``qemu-img check`` is clean and ``qemu-img
compare`` equal at the end. A share of the cases runs the parallel thread
model (``Disk.concurrent_reads``) with reader threads and a flush-heavy
writer racing the pivot.

The number of examples per test is explicit (``VDISK_JOBS_SCALE`` multiplies
them) and the examples are derandomized: every run draws the same shapes,
which differ from example to example.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jobcheck import count
from jobengine import KINDS, PARALLEL_KINDS, EngineCase, plans
from jobshapes import build, shapes

pytestmark = pytest.mark.differential

SCALE = float(os.environ.get("VDISK_JOBS_SCALE", "1"))
EXAMPLES = max(1, int(18 * SCALE))
PARALLEL_EXAMPLES = max(1, int(10 * SCALE))


def job_settings(n: int) -> settings:
    # no shrinking: each example costs a chain and threads; the failure message
    # names the shape, the plan and the step
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate], print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def run_cases(kind: str, parallel: bool, n: int,
              tmp_path_factory: pytest.TempPathFactory) -> None:
    key = f"engine {kind}{' parallel' if parallel else ''}"

    @job_settings(n)
    @given(spec=shapes(), data=st.data())
    def case(spec, data) -> None:  # noqa: ANN001 - hypothesis arguments
        plan = data.draw(plans(kind, spec.depth, parallel), label="plan")
        workdir: Path = tmp_path_factory.mktemp("case")
        count(key)
        EngineCase(build(spec, workdir), plan, workdir).run()

    case()


@pytest.mark.parametrize("kind", KINDS)
def test_engine_job(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    run_cases(kind, False, EXAMPLES, tmp_path_factory)


@pytest.mark.parametrize("kind", PARALLEL_KINDS)
def test_engine_job_parallel(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    run_cases(kind, True, PARALLEL_EXAMPLES, tmp_path_factory)
