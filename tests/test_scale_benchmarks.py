"""The scale benchmarks' quick modes run and write their tables (numbers are checked by the unit tests)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import stochastic_hypergradient, truncated_vs_implicit


def test_truncated_benchmark_quick(tmp_path: Path) -> None:
    result = truncated_vs_implicit.main(["--quick", "--out", str(tmp_path)])
    errors = [r["relative_error"] for r in result["rows"] if r["k"] is not None]
    graphs = [r["graph_bytes"] for r in result["rows"] if r["k"] is not None]
    assert errors == sorted(errors, reverse=True) and graphs == sorted(graphs)
    assert result["rows"][0]["relative_error"] < 1e-8  # implicit, CG to 1e-10
    for suffix in ("json", "md", "rst", "png"):
        assert (tmp_path / f"truncated_vs_implicit_quick.{suffix}").stat().st_size > 0


def test_stochastic_benchmark_quick(tmp_path: Path) -> None:
    result = stochastic_hypergradient.main(["--quick", "--out", str(tmp_path)])
    neumann = [r for r in result["rows"] if r["estimator"].startswith("Neumann")]
    assert neumann[-1]["relative_spread"] < neumann[0]["relative_spread"]  # larger batches, less noise
    assert "list-table" in (tmp_path / "stochastic_hypergradient_quick.rst").read_text()
