"""The scale benchmarks' quick modes run and write their tables (numbers are checked by the unit tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_meta_learning_splits_table_from_compare_outputs(tmp_path: Path) -> None:
    import json

    from benchmarks import meta_learning_splits

    def run(name: str, rows: list[tuple[str, float]], unsolved: list[float] | None = None) -> None:
        folder = tmp_path / "runs" / name
        (folder / "imaml").mkdir(parents=True)
        results = [{"method": m, "mean": acc, "ci95": 0.004, "train_seconds": 100.0, "n_episodes": 4,
                    "per_episode": [acc] * 4} for m, acc in rows]
        (folder / "comparison.json").write_text(json.dumps({"config": {"meta_batch": 8}, "results": results}))
        if unsolved is not None:
            history = [{"inner_unsolved": u} for u in unsolved]
            (folder / "imaml" / "metrics.json").write_text(json.dumps({"history": history}))

    run("w5s0", [("imaml-gd", 0.97), ("fomaml", 0.96), ("baseline (prototype)", 0.94)], unsolved=[2, 2, 0, 0])
    run("w5s0acc", [("imaml-gd", 0.975)], unsolved=[0, 0, 0, 1])
    run("w5s1", [("imaml-gd", 0.98), ("fomaml", 0.97)], unsolved=[8, 0])
    # a run made before compare kept per-episode values: they come from evaluate's evaluation.json
    results = json.loads((tmp_path / "runs" / "w5s1" / "comparison.json").read_text())
    del results["results"][1]["per_episode"]
    (tmp_path / "runs" / "w5s1" / "comparison.json").write_text(json.dumps(results))
    (tmp_path / "runs" / "w5s1" / "fomaml").mkdir()
    (tmp_path / "runs" / "w5s1" / "fomaml" / "evaluation.json").write_text(
        json.dumps({"per_episode": [1.0, 1.0, 0.9, 1.0]}))
    result = meta_learning_splits.main(["--runs", str(tmp_path / "runs"), "--ways", "5", "20",
                                        "--out", str(tmp_path / "out")])
    by = {(r["row"].split(",")[0].split(" (")[0], r["seed"], "solved" in r["row"]): r for r in result["records"]}
    assert by[("iMAML", 0, False)]["unsolved_fraction"] == 4 / 32  # 4 of 4 x 8 inner problems
    assert by[("iMAML", 0, True)]["unsolved_fraction"] == 1 / 32 and by[("iMAML", 1, False)]["accuracy"] == 0.98
    assert by[("supervised baseline", 0, False)]["unsolved_fraction"] is None
    # paired differences to the recipe (the solved iMAML) of the same split
    assert by[("iMAML", 0, False)]["paired_difference"] == pytest.approx(-0.005)
    assert by[("first-order MAML", 0, False)]["paired_difference"] == pytest.approx(0.96 - 0.975)
    assert by[("iMAML", 0, True)]["paired_difference"] is None  # the reference itself
    assert by[("first-order MAML", 1, False)]["paired_difference"] is None  # split 1 has no reference
    md = (tmp_path / "out" / "meta_learning_splits.md").read_text()
    assert ("| iMAML, 5 GD steps of 0.5 (the recipe before) | 97.00% +- 0.40% | -0.50 +- 0.00 | 100 s | 12% | "
            "98.00% +- 0.40% | - | 100 s | 50% |") in md
    assert "| first-order MAML, 5 GD steps of 0.5 | 96.00% +- 0.40% | -1.50 +- 0.00 | 100 s | - | 97.00%" in md
    assert "20-way" not in md  # no 20-way runs: no table
    for suffix in ("json", "rst", "png"):
        assert (tmp_path / "out" / f"meta_learning_splits.{suffix}").stat().st_size > 0
    assert (tmp_path / "out" / "meta_learning_splits_5way.rst").exists()


def test_sinusoid_tuning_joins_tune_outputs_that_agree(tmp_path: Path) -> None:
    import json

    from applications.meta_learning.trainer import TrainConfig
    from benchmarks import sinusoid_tuning

    config = TrainConfig(task="sinusoid", iterations=200, meta_batch=10).resolved().to_dict()

    def tuned(name: str, method: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        runs = [{"point": {"lam": lam}, "validation": v, "metric": "mse", "train_seconds": 10.0}
                for lam, v in ((1.0, 0.9), (2.0, 0.7))]
        row = {"method": method, "runs": runs, "chosen": {"lam": 2.0}, "validation": 0.7, "metric": "mse",
               "mean": 0.75, "ci95": 0.05, "train_seconds": 10.0, "tuning_seconds": 20.0, "n_episodes": 600}
        (folder / "tuning.json").write_text(json.dumps(
            {"config": {**config, **changes}, "validation_episodes": 200, "results": [row]}))
        return folder

    a, b = tuned("a", "imaml-gd"), tuned("b", "imaml-hf")
    result = sinusoid_tuning.main([str(a), str(b), "--out", str(tmp_path / "out")])
    assert [r["method"] for r in result["results"]] == ["imaml-gd", "imaml-hf"]
    md = (tmp_path / "out" / "sinusoid_tuning.md").read_text()
    assert "| imaml-hf | lam=1.0: 0.900, lam=2.0: 0.700 | lam=2.0 | 0.750 +- 0.050 | 10 s | 20 s |" in md
    rst = (tmp_path / "out" / "sinusoid_tuning.rst").read_text()
    assert rst.startswith("sinusoid: every method tuned on the same grid budget")
    with pytest.raises(ValueError, match=r"tuned with other \['iterations'\]"):
        sinusoid_tuning.join([a, tuned("c", "maml", iterations=300)])
    with pytest.raises(ValueError, match="a grid point was tuned twice"):
        sinusoid_tuning.join([a, tuned("d", "imaml-gd")])
    # one method's grid in two parts: the union of points, the better part's choice and test score
    part = tmp_path / "e"
    part.mkdir()
    data = json.loads((a / "tuning.json").read_text())
    data["results"][0].update(runs=[{"point": {"lam": 5.0}, "validation": 0.6, "metric": "mse",
                                     "train_seconds": 12.0}], chosen={"lam": 5.0}, validation=0.6, mean=0.65,
                              grid={"lam": [5.0]}, tuning_seconds=12.0)
    (part / "tuning.json").write_text(json.dumps(data))
    _, _, rows = sinusoid_tuning.join([a, b, part])
    gd = rows[0]
    assert gd["method"] == "imaml-gd" and gd["chosen"] == {"lam": 5.0} and gd["mean"] == 0.65
    assert [r["point"]["lam"] for r in gd["runs"]] == [1.0, 2.0, 5.0] and gd["tuning_seconds"] == 32.0
