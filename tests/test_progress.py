"""Long phases of the command-line applications show a progress bar on stderr; ``--no-progress`` silences them."""

from __future__ import annotations

import re

import pytest

from applications.hyperparameter_tuning.__main__ import main as hyper_main
from applications.meta_learning.cli import main as meta_main
from applications.progress import SilentBar, progress_bar

#: What a tqdm bar prints: a percentage and a bar, and a rate in units per second (or seconds per unit).
TQDM = re.compile(r"\d+%\||(it|episode|epoch|step)/s|s/(it|episode|epoch|step)")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny runs: intra-op threads only add contention on a shared 2-core runner."""


def _sinusoid_train(out, *extra):
    return ["train", "--task", "sinusoid", "--iterations", "2", "--meta-batch", "2", "--inner-steps", "2",
            "--inner-lr", "0.01", "--eval-episodes", "4", "--output", str(out), *extra]


def test_progress_bar_helper_is_silent_when_disabled(capfd):
    with progress_bar(5, "phase", unit="step", enabled=False) as bar:
        for _ in range(5):
            bar.update(1)
        bar.set_postfix(loss="1.0")
    assert isinstance(bar, SilentBar) and bar.n == 5
    assert capfd.readouterr() == ("", "")
    with progress_bar(2, "phase", unit="step") as bar:
        bar.update(2)
    err = capfd.readouterr().err
    assert "phase" in err and "2/2" in err and "step/s" in err


def test_meta_learning_train_and_evaluate_show_bars(tmp_path, capfd):
    out = tmp_path / "run"
    assert meta_main(_sinusoid_train(out)) == 0
    captured = capfd.readouterr()
    assert "imaml sinusoid meta-training" in captured.err
    assert "imaml evaluation" in captured.err and "4/4" in captured.err and "episode/s" in captured.err
    assert f"outputs in {out}/" in captured.out

    assert meta_main(["evaluate", "--checkpoint", str(out), "--episodes", "3"]) == 0
    captured = capfd.readouterr()
    assert "test evaluation" in captured.err and "3/3" in captured.err
    assert f"written {out / 'evaluation.json'}" in captured.out


def test_meta_learning_no_progress_prints_no_bar(tmp_path, capfd):
    out = tmp_path / "run"
    assert meta_main(_sinusoid_train(out, "--no-progress")) == 0
    assert meta_main(["evaluate", "--checkpoint", str(out), "--episodes", "3", "--no-progress"]) == 0
    captured = capfd.readouterr()
    assert not TQDM.search(captured.err), captured.err
    assert "evaluation" not in captured.err and "meta-training" not in captured.err
    assert "test mse" in captured.out


@pytest.mark.parametrize("progress", [True, False])
def test_meta_learning_compare_phases(tmp_path, monkeypatch, capfd, progress):
    from test_meta_training import _fake_omniglot

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot", n_characters=4, n_drawers=5)
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "omniglot", "--data", str(data), "--ways", "3", "--shots", "1", "--queries", "2",
            "--hidden", "8", "--meta-batch", "2", "--inner-steps", "2", "--iterations", "1", "--pretrain-epochs", "1",
            "--baseline-epochs", "1", "--eval-episodes", "4", "--methods", "maml,baseline", "--output", str(out)]
    assert meta_main(argv + ([] if progress else ["--no-progress"])) == 0
    captured = capfd.readouterr()
    phases = ("supervised training", "maml omniglot meta-training", "maml evaluation", "baseline evaluation")
    if progress:
        for phase in phases:
            assert phase in captured.err, phase
    else:
        assert not TQDM.search(captured.err), captured.err
        assert not any(phase in captured.err for phase in phases)
    assert f"outputs in {out}/: comparison.md, comparison.json; per method" in captured.out
    assert (out / "comparison.md").is_file() and (out / "maml").is_dir()


@pytest.mark.parametrize("progress", [True, False])
def test_hyperparameter_tuning_cli_bars(tmp_path, capfd, progress):
    out = tmp_path / "eq"
    argv = ["equilibrium", "--quick", "--max-samples", "150", "--threads", "1", "--out", str(out)]
    assert hyper_main(argv + ([] if progress else ["--no-progress"])) == 0
    captured = capfd.readouterr()
    if progress:
        assert "equilibrium training (gmres backward)" in captured.err
        assert "equilibrium training (neumann backward)" in captured.err and "step/s" in captured.err
    else:
        assert not TQDM.search(captured.err), captured.err
        assert "equilibrium training" not in captured.err
    assert f"wrote results to {out}/" in captured.out and "training_table.md" in captured.out
