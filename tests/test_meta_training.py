"""Meta-training loop, checkpoint/resume, CLI, evaluation and the MetaLearner API."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from applications.meta_learning.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from applications.meta_learning.cli import main
from applications.meta_learning.data import SinusoidTasks
from applications.meta_learning.learner import MetaLearner
from applications.meta_learning.trainer import MetaTrainer, NonFiniteMetaLossError, TrainConfig

torch.set_num_threads(1)


def _sinusoid_config(**kw) -> TrainConfig:
    base = dict(task="sinusoid", algorithm="imaml", inner_solver="gd", inner_lr=0.02, inner_steps=5, lam=2.0,
                cg_steps=3, meta_batch=4, iterations=6, checkpoint_every=3, seed=3, use_vmap=False)
    base.update(kw)
    return TrainConfig(**base)


def _fake_omniglot(root, n_alphabets=2, n_characters=5, n_drawers=20, seed=0):
    """An images_background/<alphabet>/<character>/<drawer>.png tree of random strokes."""
    rng = np.random.default_rng(seed)
    for a in range(n_alphabets):
        for c in range(n_characters):
            folder = root / "images_background" / f"Alphabet{a}" / f"character{c:02d}"
            folder.mkdir(parents=True)
            # a per-character template plus per-drawer noise: the classes are learnable
            template = rng.random((105, 105)) > 0.8
            for d in range(n_drawers):
                img = template ^ (rng.random((105, 105)) > 0.97)
                Image.fromarray(np.where(img, 0, 255).astype(np.uint8)).save(folder / f"{c:02d}_{d:02d}.png")
    return root


@pytest.mark.parametrize("use_vmap", [False, True])
def test_resume_continues_bitwise(tmp_path, use_vmap):
    cfg = _sinusoid_config(use_vmap=use_vmap)
    tasks = SinusoidTasks(shots=10, queries=10)
    straight = MetaTrainer(cfg, tasks, output_dir=tmp_path / "straight")
    straight.train(progress=False)

    first = MetaTrainer(cfg, tasks, output_dir=tmp_path / "split")
    first.train(3, progress=False)
    torch.rand(5)  # disturb the global RNG: the checkpoint must restore it
    second = MetaTrainer(cfg, tasks, output_dir=tmp_path / "split")
    second.resume()
    assert second.iteration == 3
    second.train(progress=False)

    for k in straight.theta:
        assert torch.equal(straight.theta[k], second.theta[k]), k
    assert [h["meta_loss"] for h in straight.history] == [h["meta_loss"] for h in second.history]
    a, b = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))
    assert all(float(r["inner_residual"]) > 0 for r in rows)  # the optimality check is on and logged
    # failed meta-gradient solves are counted per task, with vmap (read from the batch) and without
    assert all(0 <= float(r["backward_failed"]) <= cfg.meta_batch for r in rows)


def test_meta_training_reduces_sinusoid_query_loss():
    cfg = _sinusoid_config(inner_solver="hf", lam=5.0, inner_steps=20, hf_cg_steps=5, inner_tol=1e-3, iterations=20,
                           meta_batch=4, meta_lr=3e-3, check_optimality=1e-2)
    trainer = MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10))
    history = trainer.train(progress=False)
    first, last = np.mean([h["meta_loss"] for h in history[:6]]), np.mean([h["meta_loss"] for h in history[-6:]])
    assert last < 0.7 * first
    # the HF inner solver solves the inner problems it is asked to (none unsolved)
    assert sum(h["inner_unsolved"] for h in history) == 0


def test_nonfinite_meta_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _sinusoid_config(iterations=8, checkpoint_every=2)
    trainer = MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10), output_dir=tmp_path)
    trainer.train(2, progress=False)
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    with torch.no_grad():  # poison the meta-parameters: the next meta-loss is NaN
        next(iter(trainer.theta.values())).fill_(float("nan"))
    with pytest.raises(NonFiniteMetaLossError, match="non-finite"):
        trainer.train(progress=False)
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["iteration"] == 2
    assert all(torch.equal(kept["theta"][k], good["theta"][k]) for k in good["theta"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"iteration": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_cli_omniglot_train_evaluate_resume_and_learner(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot")
    out = tmp_path / "run"
    common = ["--task", "omniglot", "--data", str(data), "--ways", "3", "--shots", "1", "--queries", "2",
              "--hidden", "8", "--meta-batch", "4", "--inner-steps", "3", "--checkpoint-every", "2",
              "--eval-episodes", "10", "--output", str(out), "--no-progress", "--seed", "1"]
    assert main(["train", *common, "--iterations", "2"]) == 0
    assert main(["train", *common, "--iterations", "4", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed at iteration 2" in captured.err and "test accuracy" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["test"]["n_episodes"] == 10
    assert summary["config"]["check_optimality"] == 0.1
    assert (out / "learning_curve.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 4 and all(0.0 <= float(r["metric"]) <= 1.0 for r in rows)

    assert main(["evaluate", "--checkpoint", str(out), "--episodes", "12"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["n_episodes"] == 12 and len(evaluation["per_episode"]) == 12
    assert evaluation["mean"] == pytest.approx(np.mean(evaluation["per_episode"]))

    learner = MetaLearner.load(out / "checkpoint.pt")
    x = torch.rand(3, 1, 28, 28)
    learner.adapt(x, torch.arange(3))
    pred = learner.predict(torch.rand(6, 1, 28, 28))
    assert pred.shape == (6,) and pred.dtype == torch.int64 and int(pred.max()) < 3
    with pytest.raises(ValueError, match="labels must lie"):
        learner.adapt(x, torch.tensor([0, 1, 5]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/omniglot"], "brendenlake/omniglot"),
        (["--ways", "500"], "exceeds"),
        (["--shots", "10", "--queries", "15"], "drawers"),
        (["--inner-lr", "-1"], "inner_lr"),
        (["--algorithm", "maml", "--inner-solver", "hf"], "Newton-CG"),
    ],
)
def test_cli_bad_input_exits_2_with_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot", n_characters=3)
    argv = ["train", "--task", "omniglot", "--data", str(data), "--ways", "3", "--iterations", "1",
            "--output", str(tmp_path / "o"), "--no-progress", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_cli_without_omniglot_falls_back_to_sinusoid(tmp_path, monkeypatch, capsys):
    import applications.meta_learning.cli as cli

    monkeypatch.delenv("IMPLICITDIFF_OMNIGLOT", raising=False)
    monkeypatch.setattr(cli, "resolve_omniglot_root", lambda path=None: None)
    out = tmp_path / "run"
    code = main(["train", "--task", "omniglot", "--iterations", "2", "--meta-batch", "2", "--inner-steps", "2",
                 "--inner-lr", "0.01", "--eval-episodes", "4", "--output", str(out), "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "github.com/brendenlake/omniglot" in err and "sinusoid" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "sinusoid" and summary["test"]["metric"] == "mse"


def test_cli_compare_writes_one_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot")
    out = tmp_path / "cmp"
    code = main(["compare", "--task", "omniglot", "--data", str(data), "--ways", "3", "--shots", "1", "--queries", "2",
                 "--hidden", "8", "--meta-batch", "2", "--inner-steps", "2", "--iterations", "2",
                 "--eval-episodes", "6", "--methods", "imaml,maml,fomaml,baseline", "--baseline-epochs", "1",
                 "--output", str(out), "--no-progress"])
    assert code == 0
    table = (out / "comparison.md").read_text()
    for name in ("imaml-gd", "maml", "fomaml", "baseline"):
        assert f"| {name}" in table
    results = json.loads((out / "comparison.json").read_text())["results"]
    assert len(results) == 4 and all(r["n_episodes"] == 6 and math.isfinite(r["mean"]) for r in results)


# --------------------------------------------------------------------------------------
# Checkpoints that cannot be loaded: one clear error naming the file, nothing overwritten
# --------------------------------------------------------------------------------------
def _snapshot(folder):
    """Every file under ``folder``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sinusoid_cli(out, *extra):
    return ["train", "--task", "sinusoid", "--meta-batch", "2", "--inner-steps", "2", "--inner-lr", "0.01",
            "--checkpoint-every", "1", "--no-eval", "--no-progress", "--output", str(out), *extra]


@pytest.mark.parametrize("cut", ["last 10 bytes", "half"])
def test_cli_resume_from_truncated_checkpoint_names_it_and_changes_nothing(tmp_path, capsys, cut):
    out = tmp_path / "run"
    assert main(_sinusoid_cli(out, "--iterations", "2")) == 0
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    # "last 10 bytes" is the reported case: torch.load raised OSError [Errno 22] after a 9-frame traceback
    checkpoint.write_bytes(data[:-10] if cut == "last 10 bytes" else data[: len(data) // 2])
    before = _snapshot(out)
    capsys.readouterr()

    assert main(_sinusoid_cli(out, "--iterations", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and str(checkpoint) in err
    assert "is truncated or corrupt" in err and "start afresh" in err and "Traceback" not in err
    assert _snapshot(out) == before  # the broken checkpoint and every other file untouched, nothing added


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty (0 bytes)"),
        (bytes(range(7, 250)) * 3, "is corrupt or not a checkpoint at all"),
        (json.dumps({"iteration": 3, "theta": {}}).encode(), "is not a PyTorch checkpoint: it holds JSON or text"),
        ("torch", "is corrupt or not a checkpoint at all"),  # a real checkpoint with its first half cut off
        ({"config": {}, "theta": {}}, "lacks the entries ['iteration', 'optimizer', 'rng', 'history']"),
        ([1, 2, 3], "it holds a list, not a dictionary"),
    ],
    ids=["empty", "random-bytes", "json", "tail-only", "missing-keys", "not-a-dict"],
)
def test_resume_rejects_every_unloadable_checkpoint_with_one_clear_error(tmp_path, content, fragment):
    cfg = _sinusoid_config()
    path = tmp_path / "checkpoint.pt"
    if content == "torch":
        save_checkpoint(path, MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10)).state_dict())
        path.write_bytes(path.read_bytes()[len(path.read_bytes()) // 2:])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    before = _snapshot(tmp_path)
    trainer = MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10), output_dir=tmp_path)
    theta = {k: v.detach().clone() for k, v in trainer.theta.items()}
    with pytest.raises(CheckpointError, match=re.escape(fragment)) as info:
        trainer.resume()
    assert str(path) in str(info.value) and "start afresh" in str(info.value)
    assert isinstance(info.value, ValueError)  # reported by the CLI like other bad input
    assert _snapshot(tmp_path) == before
    assert trainer.iteration == 0 and all(torch.equal(trainer.theta[k], theta[k]) for k in theta)


def test_load_state_dict_checks_everything_before_changing_anything(tmp_path):
    cfg = _sinusoid_config()
    source = MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10))
    source.train(1, progress=False)
    trainer = MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10))
    theta = {k: v.detach().clone() for k, v in trainer.theta.items()}
    state = source.state_dict()
    bad_shape = {**state, "theta": {**state["theta"], "net.0.weight": torch.zeros(3, 1)}}
    with pytest.raises(CheckpointError, match=r"parameter 'net.0.weight' of shape \(3, 1\)"):
        trainer.load_state_dict(bad_shape)
    missing_param = {**state, "theta": {k: v for k, v in state["theta"].items() if k != "net.4.bias"}}
    with pytest.raises(CheckpointError, match="holds the parameters"):
        trainer.load_state_dict(missing_param)
    no_generator = {**state, "rng": {k: v for k, v in state["rng"].items() if k != "generator"}}
    with pytest.raises(CheckpointError, match=r"random-number states \['generator'\]"):
        trainer.load_state_dict(no_generator)
    assert trainer.iteration == 0 and all(torch.equal(trainer.theta[k], theta[k]) for k in theta)
    assert trainer.optimizer.state_dict()["state"] == {}


def test_unreadable_checkpoint_says_so(tmp_path, monkeypatch):
    import applications.meta_learning.checkpoint as ckpt

    path = save_checkpoint(tmp_path / "checkpoint.pt", {"iteration": 1})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "open", denied, raising=False)  # (chmod does not stop root)
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt cannot be read \(Permission denied\)"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_cli_evaluate_names_a_bad_checkpoint_without_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    checkpoint = out / "checkpoint.pt"
    save_checkpoint(checkpoint, MetaTrainer(_sinusoid_config(), SinusoidTasks(shots=10, queries=10)).state_dict())
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    before = _snapshot(out)
    assert main(["evaluate", "--checkpoint", str(out), "--episodes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: meta-training checkpoint {checkpoint} is truncated or corrupt")
    assert "Pass another checkpoint" in err and "Traceback" not in err
    assert _snapshot(out) == before  # no evaluation.json written

    # the supervised baseline's baseline.pt is a checkpoint, but not one evaluate can use: say which it is
    baseline = save_checkpoint(tmp_path / "base" / "baseline.pt",
                               {"config": _sinusoid_config().to_dict(), "baseline": {}, "model": {}})
    assert main(["evaluate", "--checkpoint", str(baseline), "--episodes", "2"]) == 2
    err = capsys.readouterr().err
    assert f"meta-training checkpoint {baseline} lacks the entries ['theta']" in err
    assert "supervised-baseline checkpoint (baseline.pt" in err and "Traceback" not in err


def test_learner_rejects_a_checkpoint_whose_parameters_do_not_fit(tmp_path):
    state = MetaTrainer(_sinusoid_config(), SinusoidTasks(shots=10, queries=10)).state_dict()
    state["theta"]["net.0.weight"] = torch.zeros(5, 1)
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match=r"does not describe a usable model .*'net.0.weight' has shape \(5, 1\)"):
        MetaLearner.load(path)


# --------------------------------------------------------------------------------------
# compare: every method with its own standard inner loop; a divergence is named
# --------------------------------------------------------------------------------------
def test_cli_compare_sinusoid_gives_maml_its_own_inner_loop(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--preset", "sinusoid", "--methods", "imaml,maml,fomaml", "--iterations", "3",
                 "--eval-episodes", "10", "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "settings maml: inner gd, 5 steps of size 0.01" in printed
    assert "settings fomaml: inner gd, 5 steps of size 0.01" in printed
    assert "settings imaml: inner hf (Newton-CG), up to 20 steps" in printed
    results = json.loads((out / "comparison.json").read_text())["results"]
    assert [r["method"] for r in results] == ["imaml-hf", "maml", "fomaml"]
    assert all(math.isfinite(r["mean"]) for r in results)
    for r in results:  # every episode's metric is kept, in order: the rows can be compared pairwise
        assert len(r["per_episode"]) == r["n_episodes"] == 10
        assert sum(r["per_episode"]) / 10 == pytest.approx(r["mean"], rel=1e-6)
    for method in ("imaml", "maml", "fomaml"):
        history = json.loads((out / method / "metrics.json").read_text())["history"]
        assert len(history) == 3 and all(math.isfinite(h["meta_loss"]) for h in history)
    settings = {r["method"]: r["settings"] for r in results}
    assert (settings["maml"]["inner_lr"], settings["maml"]["inner_steps"]) == (0.01, 5)
    assert (settings["imaml-hf"]["inner_lr"], settings["imaml-hf"]["inner_steps"]) == (0.03, 20)


def test_cli_compare_names_the_diverging_method_and_iteration(tmp_path, capsys):
    code = main(["compare", "--preset", "sinusoid", "--methods", "maml", "--maml-inner-lr", "0.1",
                 "--maml-inner-steps", "20", "--iterations", "3", "--eval-episodes", "10",
                 "--output", str(tmp_path / "cmp"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "settings maml: inner gd, 20 steps of size 0.1" in captured.out
    assert captured.err.startswith("error: maml: non-finite meta-loss") and "at iteration 1" in captured.err
    assert "inner step is too large" in captured.err and "--maml-inner-lr" in captured.err
    assert "Traceback" not in captured.err


# --------------------------------------------------------------------------------------
# plain sinusoid commands work with the defaults (the default inner step once diverged)
# --------------------------------------------------------------------------------------
def test_plain_sinusoid_commands_train_with_the_default_inner_step(tmp_path, capsys):
    # with the paper's Omniglot step (0.1) iMAML-GD's inner GD diverged at meta-iteration 3
    code = main(["train", "--task", "sinusoid", "--iterations", "8", "--eval-episodes", "10",
                 "--output", str(tmp_path / "train"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["config"]["inner_lr"] == 0.03 and math.isfinite(summary["test"]["mean"])
    # the same kind: every method of a plain compare on sinusoid, without any inner-loop flag
    code = main(["compare", "--task", "sinusoid", "--methods", "imaml,maml,fomaml", "--iterations", "8",
                 "--eval-episodes", "10", "--output", str(tmp_path / "cmp"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["results"]
    assert all(math.isfinite(r["mean"]) for r in results) and len(results) == 3
