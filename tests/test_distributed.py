"""Data-parallel implicit differentiation: two CPU processes (gloo, torchrun) against one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import implicitdiff as idiff

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as worker  # noqa: E402  # the worker script doubles as the single-process reference

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the worker on 2 processes once; return what each rank saved."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("dp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(HERE / "distributed_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    X, y, labels, X_val, y_val = worker.full_data(WORLD)
    return worker.hypergradients(False, X, y, labels, X_val, y_val)


CASES = ["ridge_cg", "ridge_direct", "ridge_gmres", "logistic_cg"]


@pytest.mark.parametrize("case", CASES)
def test_hypergradient_equals_single_process(ranks: list[dict], single: dict, case: str) -> None:
    for r in ranks:
        torch.testing.assert_close(r[case]["log_lam_grad"], single[case]["log_lam_grad"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_every_rank_reports_the_same_diagnostics(ranks: list[dict], single: dict, case: str) -> None:
    first = ranks[0][case]
    for r in ranks[1:]:
        assert (r[case]["status"], r[case]["iterations"], r[case]["residual"]) == (
            first["status"], first["iterations"], first["residual"]
        )
    assert first["status"] == single[case]["status"] == "CONVERGED"


def test_sharded_data_gets_its_own_gradient(ranks: list[dict], single: dict) -> None:
    """The gradient w.r.t. a rank's rows is that rank's part of the single-process gradient."""
    stacked = torch.cat([r["ridge_cg"]["X_grad"] for r in ranks])
    torch.testing.assert_close(stacked, single["ridge_cg"]["X_grad"], rtol=1e-9, atol=1e-12)


def test_different_cotangents_raise_on_every_rank(ranks: list[dict]) -> None:
    for r in ranks:
        assert "cotangent of the solution differs across ranks" in r["mismatch_error"]


def test_a_solution_of_the_local_shard_only_raises_on_every_rank(ranks: list[dict]) -> None:
    for r in ranks:
        assert "different solutions on different ranks" in r["local_solution_error"]


def test_optimality_check_sees_the_global_residual(ranks: list[dict]) -> None:
    assert all(r["early_stop_warned"] for r in ranks)


def test_without_process_group_the_error_names_the_fix() -> None:
    fit = idiff.implicit_diff(objective=worker.ridge_objective, distributed=idiff.DataParallel())(
        worker.ridge_solver(False)
    )
    X, y, *_ = worker.full_data(1)
    with pytest.raises(idiff.ImplicitDiffError, match="init_process_group"):
        fit(torch.zeros(worker.D, dtype=torch.float64), torch.zeros(worker.D, dtype=torch.float64), X, y)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="reduce"):
        idiff.DataParallel(reduce="max")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DataParallel"):
        idiff.implicit_diff(objective=worker.ridge_objective, distributed="gloo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        idiff.implicit_diff(objective=worker.ridge_objective, distributed=idiff.DataParallel(), mode="unrolled")
