"""``tune``: equal grid budgets, chosen on validation episodes, the choice scored once on test episodes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from applications.meta_learning.cli import main
from applications.meta_learning.comparison import evaluation_seed
from applications.meta_learning.data import SinusoidTasks, fixed_episodes
from applications.meta_learning.evaluation import evaluate
from applications.meta_learning.learner import MetaLearner
from applications.meta_learning.trainer import TrainConfig
from applications.meta_learning.tuning import method_settings, parse_grid, tune, validation_seed

torch.set_num_threads(1)


def _config(**kw) -> TrainConfig:
    base = dict(task="sinusoid", meta_batch=3, iterations=4, eval_episodes=12, checkpoint_every=4, seed=5,
                use_vmap=False)
    base.update(kw)
    return TrainConfig(**base)


def test_tune_chooses_on_validation_and_scores_the_choice_on_test(tmp_path):
    config = _config()
    rows = tune(config, {"maml": {"inner_lr": [0.003, 0.01, 0.03]}, "imaml-gd": {"inner_lr": [0.01, 0.02]}}, tmp_path,
                validation_episodes=10, progress=False)
    assert [r["method"] for r in rows] == ["maml", "imaml-gd"]
    val = fixed_episodes(SinusoidTasks(shots=10, queries=10), 10, seed=validation_seed(config))
    test = fixed_episodes(SinusoidTasks(shots=10, queries=10), 12, seed=evaluation_seed(config))
    assert not torch.equal(val[0].x_support, test[0].x_support)  # tuning never sees the test tasks
    for row, n_points in zip(rows, (3, 2)):
        runs = row["runs"]
        assert len(runs) == n_points
        # every grid point trained the same number of meta-iterations (equal budget)
        for i in range(n_points):
            history = json.loads((tmp_path / row["method"] / f"run{i}" / "metrics.json").read_text())["history"]
            assert len(history) == config.iterations
        best = min(range(n_points), key=lambda i: runs[i]["validation"])
        assert row["chosen"] == runs[best]["point"] and row["validation"] == runs[best]["validation"]
        # re-scoring the saved winner independently gives the recorded validation and test numbers
        learner = MetaLearner.load(tmp_path / row["method"] / f"run{best}" / "checkpoint.pt")
        again_val = evaluate(learner.objective, learner.theta, val, progress=False)
        again_test = evaluate(learner.objective, learner.theta, test, progress=False)
        assert again_val.mean == pytest.approx(row["validation"], rel=1e-5)
        assert again_test.mean == pytest.approx(row["mean"], rel=1e-5) and row["n_episodes"] == 12
        assert row["tuning_seconds"] >= row["train_seconds"] > 0
    assert rows[0]["runs"][0]["settings"]["inner_steps"] == 5  # MAML's own inner loop
    gd = rows[1]["runs"][1]["settings"]
    assert (gd["inner_lr"], gd["lam"], gd["inner_steps"], gd["algorithm"]) == (0.02, 2.0, 10, "imaml")
    table = (tmp_path / "tuning.md").read_text()
    assert "| maml |" in table and "| imaml-gd |" in table and "inner_lr=0.003:" in table


def test_a_diverging_grid_point_is_recorded_and_the_tuning_goes_on(tmp_path):
    config = _config(iterations=3)
    rows = tune(config, {"maml": {"inner_lr": [0.01, 0.1], "inner_steps": [20]}}, tmp_path,
                validation_episodes=6, progress=False)
    runs = rows[0]["runs"]
    assert runs[1]["validation"] is None and "non-finite meta-loss" in runs[1]["failed"]
    assert math.isfinite(runs[0]["validation"]) and rows[0]["chosen"] == {"inner_lr": 0.01, "inner_steps": 20}
    # a method whose every point fails has no row to test, and says so
    rows = tune(config, {"fomaml": {"inner_lr": [0.1], "inner_steps": [20]}}, tmp_path / "all",
                validation_episodes=6, progress=False)
    assert rows[0]["chosen"] is None and rows[0]["mean"] is None
    assert "| fomaml | inner_lr=0.1 inner_steps=20: failed | none | failed |" in (tmp_path / "all" / "tuning.md").read_text()


def test_parse_grid_and_its_errors():
    assert parse_grid("maml:inner_lr=0.01,0.1;inner_steps=1,5") == (
        "maml", {"inner_lr": [0.01, 0.1], "inner_steps": [1, 5]})
    assert parse_grid("imaml-hf:lam=2;inner_tol=none") == ("imaml-hf", {"lam": [2], "inner_tol": [None]})
    with pytest.raises(ValueError, match="unknown method 'reptile'"):
        parse_grid("reptile:inner_lr=0.1")
    with pytest.raises(ValueError, match="'learning_rate' in grid .* is not a training setting"):
        parse_grid("maml:learning_rate=0.1")
    with pytest.raises(ValueError, match="METHOD:KEY=V1,V2"):
        parse_grid("maml")
    with pytest.raises(ValueError, match="KEY=V1,V2, got 'inner_lr'"):
        parse_grid("maml:inner_lr")


def test_tune_rejects_unknown_methods_and_empty_grids(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        tune(_config(), {"reptile": {"lam": [1.0]}}, tmp_path)
    with pytest.raises(ValueError, match="grid of maml is empty"):
        tune(_config(), {"maml": {"inner_lr": []}}, tmp_path, validation_episodes=2, progress=False)
    with pytest.raises(ValueError, match="validation_episodes must be >= 1"):
        tune(_config(), {"maml": {"inner_lr": [0.01]}}, tmp_path, validation_episodes=0)


def test_method_settings_give_maml_compares_inner_loop_and_keep_imamls_on_omniglot():
    sinusoid = TrainConfig(task="sinusoid", inner_solver="hf", inner_tol=1e-3)
    assert method_settings("imaml-hf", sinusoid)["inner_tol"] == 1e-3
    assert method_settings("maml", sinusoid) == {"algorithm": "maml", "inner_lr": 0.01, "inner_steps": 5,
                                                 "inner_tol": None, "inner_solver": "gd"}
    recipe = TrainConfig(task="omniglot", inner_steps=20, inner_lr=0.25, inner_tol=0.1)
    assert method_settings("imaml-gd", recipe) == {"algorithm": "imaml", "inner_solver": "gd"}
    # the recipe solves to a tolerance: MAML takes its fixed 5 steps of 0.5, as in compare
    assert method_settings("fomaml", recipe) == {"algorithm": "fomaml", "inner_lr": 0.5, "inner_steps": 5,
                                                 "inner_tol": None}
    assert method_settings("maml", TrainConfig(task="omniglot", inner_steps=16)) == {"algorithm": "maml"}


def test_cli_tune_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--task", "sinusoid", "--methods", "fomaml", "--grid", "maml:inner_lr=0.01,0.02",
                 "--iterations", "2", "--meta-batch", "2", "--eval-episodes", "6", "--validation-episodes", "4",
                 "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "tuning.json").read_text())["results"]
    assert [r["method"] for r in results] == ["fomaml", "maml"]
    assert [len(r["runs"]) for r in results] == [3, 2]  # fomaml's default grid, maml's given one
    assert "every method tuned on the same grid budget" in printed and "| maml |" in printed
    code = main(["tune", "--task", "sinusoid", "--methods", "maml", "--grid", "maml:lr=0.1", "--output",
                 str(out)])
    assert code == 2 and "'lr' in grid" in capsys.readouterr().err
