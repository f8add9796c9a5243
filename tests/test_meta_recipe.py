"""The pieces of the Omniglot recipe: prototype-initialised heads, pre-training, augmentation.

* The prototype head's meta-gradient (implicit solve + the path through the prototypes) against
  a dense float64 reference written here, and MAML's against hand-unrolled autograd.
* At the anchor (zero inner steps) the prototype head is the baseline's cosine classifier.
* ``random_affine``: determinism, identity at zero strength, a known shift, bad input.
* The trainer: pre-training copies the baseline's encoder, survives resume without repeating
  itself, and augmented training resumes bit for bit.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as nnf
from test_meta_algorithms import _flat, _unflat

import implicitdiff as idiff
from applications.meta_learning.algorithms import (
    AlgorithmConfig,
    FunctionalModel,
    MetaObjective,
)
from applications.meta_learning.augmentation import random_affine
from applications.meta_learning.baseline import (
    BaselineConfig,
    _prototype_predictions,
    train_baseline,
)
from applications.meta_learning.cli import main
from applications.meta_learning.data import OmniglotTasks
from applications.meta_learning.inner_solvers import GradientDescent, proximal_objective
from applications.meta_learning.models import CosineHead, OmniglotCNN
from applications.meta_learning.trainer import MetaTrainer, TrainConfig

torch.set_num_threads(1)


class TinyProtoNet(torch.nn.Module):
    """2 -> 4 tanh encoder and a 3-way cosine head: smooth, small enough for dense Hessians."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh())
        self.head = CosineHead(4, 3, scale=3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).flatten(1))


def _batch(n_tasks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # every class has 2 support examples scattered around a class centre (a few-shot task)
    centres = 2 * torch.randn(n_tasks, 3, 2, generator=g, dtype=torch.float64)
    ys = torch.arange(3).repeat(2).expand(n_tasks, 6).clone()
    yq = torch.randint(0, 3, (n_tasks, 9), generator=g)
    pick = lambda y: torch.stack([c[i] for c, i in zip(centres, y)])  # noqa: E731
    xs = pick(ys) + 0.5 * torch.randn(n_tasks, 6, 2, generator=g, dtype=torch.float64)
    xq = pick(yq) + 0.5 * torch.randn(n_tasks, 9, 2, generator=g, dtype=torch.float64)
    return xs, ys, xq, yq


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = FunctionalModel(TinyProtoNet().double())
    return net


def _reference_anchor(net, theta, xs, ys):
    """Prototypes written independently: per-class mean of the normalised encoder outputs."""
    features = nnf.normalize(net.module.encoder[1](xs @ theta["encoder.0.weight"].T + theta["encoder.0.bias"]), dim=-1)
    protos = torch.stack([features[ys == c].mean(0) for c in range(3)])
    return {**theta, "head.weight": protos}


def test_meta_parameters_leave_out_the_per_task_head():
    net = _setup()
    obj = MetaObjective(net, "classification", AlgorithmConfig("imaml", prototype_head=True), use_vmap=False)
    assert obj.per_task_keys == ("head.weight",)
    assert sorted(obj.meta_parameters()) == ["encoder.0.bias", "encoder.0.weight", "head.scale"]
    plain = MetaObjective(net, "classification", AlgorithmConfig("imaml"), use_vmap=False)
    assert "head.weight" in plain.meta_parameters()


def test_prototype_head_needs_a_cosine_classifier():
    linear = FunctionalModel(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    with pytest.raises(ValueError, match="cosine head"):
        MetaObjective(linear, "classification", AlgorithmConfig("imaml", prototype_head=True))
    with pytest.raises(ValueError, match="cosine head"):
        MetaObjective(_setup(), "regression", AlgorithmConfig("imaml", prototype_head=True))


@pytest.mark.parametrize("use_vmap", [False, True])
def test_prototype_head_imaml_meta_gradient_matches_dense_float64_reference(use_vmap):
    lam = 1.5
    net = _setup(1)
    solver = GradientDescent(lr=0.3, steps=600)
    cfg = AlgorithmConfig("imaml", lam=lam, inner=solver, cg_steps=60, meta_solver="minres",
                          check_optimality=1e-6, prototype_head=True)
    obj = MetaObjective(net, "classification", cfg, use_vmap=use_vmap)
    theta = {k: v.requires_grad_() for k, v in obj.meta_parameters().items()}
    xs, ys, xq, yq = _batch(2, seed=3)
    obj.batch(theta, xs, ys, xq, yq).losses.mean().backward()
    got = _flat({k: v.grad for k, v in theta.items()})

    expected = torch.zeros_like(got)
    for b in range(2):
        th = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
        anchor = _reference_anchor(net, th, xs[b], ys[b])
        fixed = {k: v.detach() for k, v in anchor.items()}
        phi = solver.solve(obj.loss_fn, fixed, fixed, lam, xs[b], ys[b])
        residual = _flat(torch.func.grad(proximal_objective(obj.loss_fn, lam))(phi, fixed, xs[b], ys[b]))
        assert residual.norm() < 1e-9  # the reference needs a solved inner problem
        train = lambda v: nnf.cross_entropy(net(_unflat(v, fixed), xs[b]), ys[b])  # noqa: E731
        test = lambda v: nnf.cross_entropy(net(_unflat(v, fixed), xq[b]), yq[b])  # noqa: E731
        p = _flat(phi)
        H = torch.func.hessian(train)(p)
        # d phi*/d anchor = lam (H + lam I)^-1, so the anchor's cotangent is (I + H/lam)^-1 g
        u = torch.linalg.solve(torch.eye(p.numel(), dtype=torch.float64) + H / lam, torch.func.grad(test)(p))
        grads = torch.autograd.grad(_flat(anchor), list(th.values()), u)
        expected += _flat(dict(zip(th, grads))) / 2
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    # the prototypes carry part of it: the encoder gradient is not the head-free one
    assert theta["encoder.0.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("use_vmap", [False, True])
def test_prototype_head_maml_matches_hand_unrolled_autograd(use_vmap):
    lr, steps = 0.4, 4
    net = _setup(2)
    cfg = AlgorithmConfig("maml", inner=GradientDescent(lr, steps), prototype_head=True)
    obj = MetaObjective(net, "classification", cfg, use_vmap=use_vmap)
    theta = {k: v.requires_grad_() for k, v in obj.meta_parameters().items()}
    xs, ys, xq, yq = _batch(3, seed=4)
    obj.batch(theta, xs, ys, xq, yq).losses.mean().backward()
    got = _flat({k: v.grad for k, v in theta.items()})

    ref = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    total = 0.0
    for b in range(3):
        # Inner gradients are partial derivatives in each parameter: the network reads aliases
        # of theta, so autograd.grad w.r.t. them does not also follow the path through the prototypes.
        phi = {k: v * 1.0 for k, v in _reference_anchor(net, ref, xs[b], ys[b]).items()}
        for _ in range(steps):
            loss = nnf.cross_entropy(net(phi, xs[b]), ys[b])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
        total = total + nnf.cross_entropy(net(phi, xq[b]), yq[b]) / 3
    expected = _flat(dict(zip(ref, torch.autograd.grad(total, list(ref.values())))))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_prototype_anchor_is_the_baselines_cosine_classifier():
    """At the anchor, the CNN with a prototype head predicts what the cosine-prototype baseline predicts."""
    torch.manual_seed(0)
    module = OmniglotCNN(5, hidden=8, head="cosine")
    net = FunctionalModel(module)
    obj = MetaObjective(net, "classification", AlgorithmConfig("imaml", prototype_head=True), use_vmap=False)
    theta = obj.meta_parameters()
    tasks = OmniglotTasks(torch.rand(10, 6, 1, 28, 28), ways=5, shots=2, queries=3)
    episode = tasks.sample(4, torch.Generator().manual_seed(1))
    for xs, ys, xq, yq in zip(*episode):
        anchor = obj.task_anchor(theta, xs, ys)
        predicted = net(anchor, xq).argmax(-1)
        with torch.no_grad():
            support, query = module.features(xs), module.features(xq)
        reference = _prototype_predictions(support[None], ys[None], query[None], 5)[0]
        assert torch.equal(predicted, reference)


# -- augmentation ---------------------------------------------------------------------------
def test_random_affine_is_deterministic_and_per_image():
    x = torch.rand(2, 3, 1, 28, 28)
    a = random_affine(x, torch.Generator().manual_seed(5))
    b = random_affine(x, torch.Generator().manual_seed(5))
    c = random_affine(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    # the same image, repeated, is distorted differently in each position
    same = random_affine(x[:1, :1].expand(1, 4, 1, 28, 28), torch.Generator().manual_seed(0))
    assert not torch.allclose(same[0, 0], same[0, 1])


def test_random_affine_zero_strength_is_the_identity_and_a_shift_moves_a_dot():
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    same = random_affine(x, torch.Generator(), max_rotation=0, max_scale=0, max_shift=0)
    torch.testing.assert_close(same, x, atol=1e-12, rtol=0)
    dot = torch.zeros(50, 1, 16, 16, dtype=torch.float64)
    dot[..., 7:9, 7:9] = 1.0
    moved = random_affine(dot, torch.Generator().manual_seed(0), max_rotation=0, max_scale=0, max_shift=0.25)
    # mass is conserved (the dot stays inside) and its centre moves by at most 0.25 * 8 = 2 pixels
    torch.testing.assert_close(moved.sum((1, 2, 3)), dot.sum((1, 2, 3)), atol=1e-9, rtol=0)
    grid = torch.arange(16, dtype=torch.float64)
    centre_x = (moved.sum(2).squeeze(1) * grid).sum(-1) / moved.sum((1, 2, 3))
    assert (centre_x - 7.5).abs().max() <= 2.0 + 1e-9 and (centre_x - 7.5).abs().max() > 0.5


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.zeros(28, 28), {}, r"\[\.\.\., C, H, W\]"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), {}, "floating"),
        (torch.zeros(2, 1, 4, 4), {"max_rotation": float("nan")}, "max_rotation"),
        (torch.zeros(2, 1, 4, 4), {"max_scale": 1.0}, "max_scale must be < 1"),
        (torch.zeros(2, 1, 4, 4), {"max_shift": -0.1}, "max_shift"),
    ],
)
def test_random_affine_rejects_bad_input(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_affine(images, torch.Generator(), **kwargs)


def test_augmented_baseline_differs_from_plain_and_is_deterministic():
    images = torch.rand(6, 4, 1, 28, 28)
    cfg = dict(epochs=1, hidden=8, batch_size=8)
    plain, _ = train_baseline(images, BaselineConfig(augment=False, **cfg), progress=False)
    aug1, _ = train_baseline(images, BaselineConfig(augment=True, **cfg), progress=False)
    aug2, _ = train_baseline(images, BaselineConfig(augment=True, **cfg), progress=False)
    w = lambda m: m.encoder[0].weight  # noqa: E731
    assert torch.equal(w(aug1), w(aug2)) and not torch.equal(w(aug1), w(plain))


# -- trainer ---------------------------------------------------------------------------------
def _tiny_recipe(**changes) -> TrainConfig:
    values = dict(ways=3, shots=1, queries=2, head="prototype", pretrain_epochs=1, augment=True, hidden=8,
                  meta_batch=2, iterations=3, inner_steps=2, meta_solver="minres", checkpoint_every=1,
                  eval_episodes=4)
    values.update(changes)
    return TrainConfig(**values)


def _tasks() -> OmniglotTasks:
    return OmniglotTasks(torch.rand(8, 5, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                         ways=3, shots=1, queries=2)


def test_pretraining_copies_the_baselines_encoder_and_counts_its_time():
    tasks = _tasks()
    trainer = MetaTrainer(_tiny_recipe(), tasks)
    assert not trainer.pretrained
    trainer.pretrain()
    model, _ = train_baseline(tasks.images, BaselineConfig(epochs=1, seed=0, hidden=8, augment=True), progress=False)
    for name, value in model.encoder.state_dict().items():
        torch.testing.assert_close(trainer.theta[f"encoder.{name}"].detach(), value, rtol=0, atol=0)
    assert trainer.pretrained and trainer.train_seconds > 0
    assert trainer.pretrain_stats["num_classes"] == 8 * 4


def test_recipe_training_resumes_bit_for_bit_without_pretraining_again(tmp_path, monkeypatch):
    tasks = _tasks()
    full = MetaTrainer(_tiny_recipe(), tasks, output_dir=tmp_path / "full")
    full.train(progress=False)

    first = MetaTrainer(_tiny_recipe(), tasks, output_dir=tmp_path / "part")
    first.train(2, progress=False)
    resumed = MetaTrainer(_tiny_recipe(), tasks, output_dir=tmp_path / "part")
    resumed.resume()
    monkeypatch.setattr(MetaTrainer, "pretrain", lambda self, **kw: pytest.fail("pre-trained twice"))
    resumed.train(progress=False)
    for k in full.theta:
        assert torch.equal(full.theta[k], resumed.theta[k]), k
    assert [h["meta_loss"] for h in full.history] == [h["meta_loss"] for h in resumed.history]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(head="softmax"), "head must be one of"),
        (dict(pretrain_epochs=-1), "pretrain_epochs"),
        (dict(task="sinusoid", head="prototype"), "head='prototype' is for Omniglot"),
        (dict(task="sinusoid", augment=True, head="linear", pretrain_epochs=0), "augment=True is for Omniglot"),
    ],
)
def test_bad_recipe_settings_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        _tiny_recipe(**changes).resolved()


def test_cli_trains_the_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    """``train --head prototype --pretrain-epochs 1 --augment`` on a tiny synthetic Omniglot folder."""
    from test_meta_training import _fake_omniglot

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _fake_omniglot(tmp_path / "omniglot", n_drawers=5)
    out = tmp_path / "run"
    code = main(["train", "--data", str(root), "--ways", "3", "--queries", "2", "--hidden", "8",
                 "--head", "prototype", "--pretrain-epochs", "1", "--augment", "--meta-solver", "minres",
                 "--meta-batch", "2", "--inner-steps", "2", "--iterations", "2", "--eval-episodes", "6",
                 "--no-progress", "--output", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["head"] == "prototype" and summary["iterations"] == 2
    assert summary["test"]["n_episodes"] == 6 and summary["pretrained_baseline"]["n_episodes"] == 6
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "supervised baseline (the pre-trained start" in printed
    # the checkpoint has no head weights (they are per task) and still evaluates and adapts
    assert main(["evaluate", "--checkpoint", str(out), "--episodes", "4"]) == 0
    from applications.meta_learning.learner import MetaLearner

    learner = MetaLearner.load(out / "checkpoint.pt")
    assert "head.weight" not in learner.theta
    x = torch.rand(3, 1, 28, 28)
    learner.adapt(x, torch.arange(3))
    assert learner.predict(torch.rand(5, 1, 28, 28)).shape == (5,)


def test_imaml_backward_records_one_solve_per_task_with_prototype_head():
    net = _setup(3)
    cfg = AlgorithmConfig("imaml", lam=2.0, inner=GradientDescent(0.3, 20), cg_steps=4, meta_solver="minres",
                          check_optimality=None, prototype_head=True)
    obj = MetaObjective(net, "classification", cfg, use_vmap=False)
    theta = {k: v.requires_grad_() for k, v in obj.meta_parameters().items()}
    with idiff.record_solves() as log:
        obj.batch(theta, *_batch(3, seed=8)).losses.mean().backward()
    assert len([i for i in log if i.kind == "backward"]) == 3


def test_comparison_table_names_the_recipe():
    from applications.meta_learning.comparison import format_table

    rows = [{"method": "imaml-gd", "metric": "accuracy", "mean": 0.97, "ci95": 0.003, "n_episodes": 600,
             "train_seconds": 700.0}]
    table = format_table(rows, _tiny_recipe().resolved())
    assert "(meta-learners: prototype head, 1 pre-training epochs, augmented tasks)" in table
    assert "| imaml-gd | accuracy 97.00% +- 0.30% | 600 | 700 s |" in table
    assert "meta-learners" not in format_table(rows, TrainConfig(ways=3).resolved())


def test_command_line_defaults_for_omniglot_are_the_recipe():
    from applications.meta_learning.cli import build_parser, config_from_args
    from applications.meta_learning.presets import OMNIGLOT_RECIPE

    def config(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    plain = config("--ways", "20")
    assert {k: getattr(plain, k) for k in OMNIGLOT_RECIPE} == OMNIGLOT_RECIPE and plain.ways == 20
    assert config("--lam", "3").lam == 3.0  # explicit flags win
    paper = config("--preset", "paper-5way-1shot")  # a preset replaces the recipe: the paper's values
    assert (paper.head, paper.pretrain_epochs, paper.augment, paper.lam, paper.meta_solver) == (
        "linear", 0, False, 2.0, "cg")
    assert config("--task", "sinusoid").head == "linear"  # no recipe outside Omniglot


def test_fallback_to_sinusoid_keeps_only_flags_that_apply(tmp_path, monkeypatch, capsys):
    from applications.meta_learning import cli

    monkeypatch.setattr(cli, "resolve_omniglot_root", lambda path: None)
    args = cli.build_parser().parse_args(["train", "--preset", "quick", "--hidden", "8", "--seed", "4"])
    config = cli._omniglot_or_fallback(cli.config_from_args(args), args)
    assert (config.task, config.head, config.pretrain_epochs, config.seed, config.hidden) == ("sinusoid", "linear", 0, 4, 40)
    assert "Running the sinusoid regression task instead" in capsys.readouterr().err


def test_cli_trains_and_scores_the_baseline_alone(tmp_path, monkeypatch, capsys):
    from test_meta_training import _fake_omniglot

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = _fake_omniglot(tmp_path / "omniglot", n_drawers=5)
    out = tmp_path / "base"
    assert main(["train", "--algorithm", "baseline", "--data", str(root), "--ways", "3", "--queries", "2",
                 "--hidden", "8", "--pretrain-epochs", "2", "--eval-episodes", "20", "--no-progress",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"]["epochs"] == 2 and summary["test"]["n_episodes"] == 20
    assert summary["test"]["accuracy"] > 1 / 3 + 0.1  # learnable synthetic characters: clearly above chance
    assert (out / "baseline.pt").stat().st_size > 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["train", "--algorithm", "baseline", "--task", "sinusoid", "--output", str(out)]) == 2
    assert "needs the Omniglot data" in capsys.readouterr().err


def test_compare_trains_the_shared_supervised_start_once(tmp_path, monkeypatch):
    from applications.meta_learning import comparison
    from applications.meta_learning.data import OmniglotCharacters

    calls = []
    real = comparison.train_baseline
    monkeypatch.setattr(comparison, "train_baseline", lambda *a, **k: calls.append(k) or real(*a, **k))
    images = torch.rand(20, 5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    characters = OmniglotCharacters(images, [f"a/c{i:02d}" for i in range(20)])
    config = _tiny_recipe(pretrain_epochs=2, iterations=1, eval_episodes=4)
    rows = comparison.compare(config, ["imaml", "baseline", "fomaml"], tmp_path, progress=False,
                              baseline_config=BaselineConfig(epochs=2, seed=0, hidden=8), characters=characters)
    assert len(calls) == 1  # one supervised training for the baseline row and both pre-trained starts
    base_seconds = rows[1]["train_seconds"]
    assert rows[0]["train_seconds"] >= base_seconds and rows[2]["train_seconds"] >= base_seconds
    for row in rows:  # per-episode accuracies of the same episodes, baseline row included
        assert len(row["per_episode"]) == 4 and sum(row["per_episode"]) / 4 == pytest.approx(row["mean"])


def test_the_recipe_solves_the_inner_problem_and_maml_keeps_its_fixed_budget():
    from applications.meta_learning.cli import build_parser, config_from_args
    from applications.meta_learning.comparison import maml_inner_loop
    from applications.meta_learning.presets import MAML_OMNIGLOT, OMNIGLOT_RECIPE, apply_preset

    # iMAML's implicit gradient assumes a solved inner problem: the recipe stops at a tolerance
    assert OMNIGLOT_RECIPE["inner_tol"] == 0.1 and OMNIGLOT_RECIPE["inner_steps"] >= 20
    assert apply_preset("quick")["inner_tol"] == 0.1  # the README's main job is the recipe
    recipe = config_from_args(build_parser().parse_args(["compare", "--ways", "20"]))
    maml = dataclasses.replace(recipe, algorithm="maml", **maml_inner_loop(recipe)).resolved()
    assert (maml.inner_steps, maml.inner_lr, maml.inner_tol) == (MAML_OMNIGLOT["inner_steps"],
                                                                MAML_OMNIGLOT["inner_lr"], None)
    # a fixed-step run keeps its own loop for MAML; explicit --maml-inner-* flags win
    paper = config_from_args(build_parser().parse_args(["compare", "--preset", "paper-5way-1shot"]))
    assert maml_inner_loop(paper) == {}
    assert maml_inner_loop(recipe, inner_lr=0.1, inner_steps=3) == {"inner_lr": 0.1, "inner_steps": 3,
                                                                    "inner_tol": None}
    hf = dataclasses.replace(recipe, inner_solver="hf")
    assert maml_inner_loop(hf)["inner_solver"] == "gd"
    # the recipe as it was (a fixed budget): --inner-tol off; MAML then keeps the run's loop
    before = config_from_args(build_parser().parse_args(
        ["compare", "--inner-steps", "5", "--inner-lr", "0.5", "--inner-tol", "off"]))
    assert (before.inner_steps, before.inner_lr, before.inner_tol, before.head) == (5, 0.5, None, "prototype")
    assert maml_inner_loop(before) == {}
