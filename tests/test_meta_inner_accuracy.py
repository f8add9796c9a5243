"""The inner-accuracy report of iMAML (``inner-accuracy``): residuals, times, cosines with a tight reference.

Tiny sizes: sinusoid tasks with the smooth (SiLU) MLP, where Newton-CG solves the proximal
inner problem to rounding, and a 3-way Omniglot CNN of 8 filters on generated characters for
the prototype head and the command line.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_meta_training import _fake_omniglot

from applications.meta_learning.checkpoint import save_checkpoint
from applications.meta_learning.cli import main
from applications.meta_learning.inner_accuracy import (
    BacktrackingGD,
    format_markdown,
    inner_accuracy_report,
    parse_solver,
)
from applications.meta_learning.inner_solvers import GradientDescent
from applications.meta_learning.trainer import TrainConfig, build_network

torch.set_num_threads(1)

TIGHT = "hf:20,cg=10,tol=1e-6"


def _sinusoid_config(**kw) -> TrainConfig:
    base = dict(task="sinusoid", algorithm="imaml", lam=5.0, inner_lr=0.02, inner_steps=5, cg_steps=5,
                meta_solver="minres", meta_batch=2, hidden=16, seed=0)
    base.update(kw)
    return TrainConfig(**base).resolved()


@pytest.fixture(scope="module")
def sinusoid_report():
    config = _sinusoid_config()
    return inner_accuracy_report(config, None, ["gd:1", "gd:20", "hf:10,tol=1e-5", "gd:20,grad=fo"],
                                 reference=TIGHT, tasks=4, tolerance=0.1)


def test_report_fields(sinusoid_report):
    report = sinusoid_report
    assert report["reference"] == TIGHT
    assert report["tasks"]["count"] == 4 and report["tasks"]["split"] == "test"
    assert report["settings"]["tolerance"] == 0.1 and report["settings"]["meta_batch"] == 2
    assert report["theta"]["source"].startswith("initial")
    # 4 tasks in meta-batches of 2: one pair of different meta-batches to compare
    assert report["sampling_yardstick"]["meta_batch_pairs"] == 1
    assert -1 <= report["sampling_yardstick"]["cosine_mean"] <= 1
    # the listed solvers in order, then the reference (not listed itself)
    assert [r["label"] for r in report["solvers"]] == ["gd:1", "gd:20", "hf:10,tol=1e-5", "gd:20,grad=fo", TIGHT]
    for r in report["solvers"]:
        assert set(r["residual"]) == {"mean", "median", "p90", "max"}
        assert set(r["distance_to_reference"]) == {"mean", "median", "max"}
        assert 0 <= r["above_tolerance"] <= 4 and r["fraction_above_tolerance"] == r["above_tolerance"] / 4
        assert r["seconds_per_task"]["total"] >= r["seconds_per_task"]["inner"] > 0
        c = r["cosine"]
        assert -1 - 1e-9 <= c["per_task_min"] <= c["per_task_median"] <= 1 + 1e-9
        assert c["meta_batch_mean"] is not None and c["all_tasks_mean_gradient"] <= 1 + 1e-9
        assert len(r["per_task"]["residual"]) == len(r["per_task"]["cosine"]) == 4
        assert r["meta_steps"] == 5
    assert [r["meta_gradient"] for r in report["solvers"]] == ["implicit"] * 3 + ["first-order", "implicit"]


def test_tight_solver_is_solved_and_matches_the_reference(sinusoid_report):
    by = {r["label"]: r for r in sinusoid_report["solvers"]}
    ref, hf = by[TIGHT], by["hf:10,tol=1e-5"]
    assert ref["residual"]["max"] < 1e-3 and ref["above_tolerance"] == 0
    assert ref["cosine"]["per_task_min"] == pytest.approx(1.0, abs=1e-9)
    assert ref["distance_to_reference"]["max"] == 0.0
    # another tight solver lands on the same solution and the same meta-gradient
    assert hf["residual"]["max"] < 1e-3  # float32 rounding: 1e-4 on some tasks
    assert hf["cosine"]["per_task_min"] > 0.999 and hf["cosine"]["all_tasks_mean_gradient"] > 0.999
    assert hf["distance_to_reference"]["max"] < 1e-3
    assert by["gd:1"]["distance_to_reference"]["mean"] > by["gd:20"]["distance_to_reference"]["mean"]
    # one GD step is further from a solution than twenty, and its meta-gradient further from the reference's
    assert by["gd:1"]["residual"]["mean"] > by["gd:20"]["residual"]["mean"]
    assert by["gd:1"]["above_tolerance"] == 4
    assert by["gd:1"]["cosine"]["per_task_mean"] < by["gd:20"]["cosine"]["per_task_mean"]
    # the first-order gradient at the same inner solution is not the implicit one
    assert by["gd:20,grad=fo"]["residual"]["mean"] == pytest.approx(by["gd:20"]["residual"]["mean"])
    assert by["gd:20,grad=fo"]["cosine"]["per_task_mean"] < 0.9999


def test_markdown_table(sinusoid_report):
    text = format_markdown(sinusoid_report)
    assert text.startswith("### Inner problem: sinusoid")
    assert f"| `{TIGHT} (reference)` |" in text and "| `gd:1` |" in text and "/4 (" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 5 and all(line.count("|") == 13 for line in rows)
    assert "Yardstick: the reference's mean meta-gradients of two different meta-batches of 2 tasks" in text


def test_backtracking_gd_reaches_the_tolerance_where_a_fixed_step_diverges():
    loss = lambda p, x, y: 40 * ((p["w"] - y) ** 2).sum()  # noqa: E731  curvature 81 with lam = 1
    zero, one = {"w": torch.zeros(3)}, torch.ones(3)
    grad0 = (81 * 0 - 80) * 1.0
    fixed = GradientDescent(lr=0.5, steps=20).solve(loss, zero, zero, 1.0, None, one)
    searched = BacktrackingGD(lr=0.5, steps=60, tol=1e-6).solve(loss, zero, zero, 1.0, None, one)
    g = lambda w: 81 * w - 80  # noqa: E731
    assert float(g(fixed["w"]).abs().max()) > 1e3 * abs(grad0)  # diverged
    assert float(g(searched["w"]).abs().max()) <= 1e-5 * abs(grad0)
    assert torch.allclose(searched["w"], torch.full((3,), 80 / 81))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sgd:5", "unknown kind"),
        ("gd", "steps is missing"),
        ("gd:five", "must be an integer"),
        ("gd:0", ">= 1"),
        ("gd:5,cg=3", "not 'cg'"),
        ("hf:5,lr=0.1", "not 'lr'"),
        ("gd:5,tol=-1", "positive number"),
        ("gd:5,tol", "not key=value"),
        ("gd:5,grad=second", "'fo' or 'implicit'"),
        ("hf:5,meta=0", "positive integer"),
        ("gd:5,lr=0.1,lr=0.2", "given twice"),
    ],
)
def test_bad_solver_spec_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match="expected KIND:STEPS") as err:
        parse_solver(spec)
    assert message in str(err.value)


def test_parse_solver_fields():
    spec = parse_solver(" gdls:30, lr=0.25, tol=1e-2, meta=20 ")
    assert (spec.kind, spec.steps, spec.lr, spec.tol, spec.meta_steps, spec.label) == (
        "gdls", 30, 0.25, 0.01, 20, "gdls:30,lr=0.25,tol=1e-2,meta=20")
    assert isinstance(spec.build(0.5), BacktrackingGD)
    assert parse_solver("gd:4").build(0.3) == GradientDescent(lr=0.3, steps=4)


def test_activation_what_if_is_recorded():
    report = inner_accuracy_report(_sinusoid_config(), None, ["gd:2"], reference="gd:4", tasks=2, activation="tanh",
                                   per_task=False)
    assert report["settings"]["activation"].startswith("tanh (what-if")
    assert "per_task" not in report["solvers"][0]


def test_report_rejects_bad_requests():
    config = _sinusoid_config()
    with pytest.raises(ValueError, match="named twice"):
        inner_accuracy_report(config, None, ["gd:2", "gd:2"], reference=TIGHT, tasks=1)
    with pytest.raises(ValueError, match="tasks must be"):
        inner_accuracy_report(config, None, ["gd:2"], reference=TIGHT, tasks=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        inner_accuracy_report(config, None, ["gd:2"], reference=TIGHT, tasks=1, activation="gelu")
    with pytest.raises(ValueError, match="iMAML's proximal inner problem"):
        inner_accuracy_report(_sinusoid_config(algorithm="fomaml"), None, ["gd:2"], reference=TIGHT, tasks=1)


# --------------------------------------------------------------------------------------
# The command line, on a checkpoint of a tiny prototype-head CNN
# --------------------------------------------------------------------------------------
def _checkpoint(tmp_path, data, head="prototype"):
    config = TrainConfig(task="omniglot", data=str(data), ways=3, shots=1, queries=2, hidden=8, head=head,
                         lam=1.0, inner_steps=3, inner_lr=0.5, meta_solver="minres", meta_batch=2,
                         iterations=1).resolved()
    torch.manual_seed(0)
    net = build_network(config)
    theta = {k: v.detach() for k, v in net.named_parameters() if not (head == "prototype" and k == "head.weight")}
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"config": config.to_dict(), "theta": theta, "iteration": 7})
    return path


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot", n_characters=4)
    path = _checkpoint(tmp_path, data)
    out = tmp_path / "ia"
    # a prototype head takes another number of ways than it was trained with
    code = main(["inner-accuracy", "--checkpoint", str(path.parent), "--ways", "4", "--tasks", "3",
                 "--solvers", "gd:3,lr=0.5", "gdls:5,tol=0.1", "--reference", "hf:5,tol=1e-3",
                 "--output", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| `gd:3,lr=0.5` |" in printed and "meta-iteration 7" in printed
    report = json.loads((out / "inner_accuracy.json").read_text())
    assert report["tasks"]["ways"] == 4 and report["tasks"]["queries"] == 15
    assert report["theta"]["source"].endswith("checkpoint.pt") and report["theta"]["iteration"] == 7
    assert [r["label"] for r in report["solvers"]] == ["gd:3,lr=0.5", "gdls:5,tol=0.1", "hf:5,tol=1e-3"]
    assert report["settings"]["run_solver"] == "gd:3,lr=0.5" and report["settings"]["lam"] == 1.0
    assert (out / "inner_accuracy.md").read_text() == format_markdown(report)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--solvers", "gd:x"], "steps must be an integer"),
        (["--tasks", "0"], "tasks must be >= 1"),
        (["--ways", "4", "--linear"], "measure at --ways of the run"),
        (["--preset", "quick"], "--preset describes an untrained model"),
        (["--checkpoint-missing"], "no meta-training checkpoint"),
    ],
)
def test_cli_bad_arguments_exit_2_with_a_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot", n_characters=4)
    linear = "--linear" in args
    path = _checkpoint(tmp_path, data, head="linear" if linear else "prototype")
    args = [a for a in args if a != "--linear"]
    if "--checkpoint-missing" in args:
        args, path = [], tmp_path / "nowhere" / "checkpoint.pt"
    argv = ["inner-accuracy", "--checkpoint", str(path), "--tasks", "1", "--solvers", "gd:1",
            "--reference", "gd:2", "--output", str(tmp_path / "o"), "--no-progress", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
