"""The Lake et al. (2015) one-shot runs as an evaluation source, and training on all characters."""

from __future__ import annotations

import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from applications.meta_learning.cli import main
from applications.meta_learning.data import load_image
from applications.meta_learning.lake import LABELS_FILE, load_lake_runs

torch.set_num_threads(1)


def _strokes(rng, n=4):
    """Random line segments (a character's strokes): a list of ((x0, y0), (x1, y1))."""
    return [tuple(map(tuple, rng.integers(10, 95, size=(2, 2)))) for _ in range(n)]


def _draw(strokes, rng, jitter=2):
    """105x105 black strokes on white, the segments moved by a few pixels (another drawer)."""
    image = Image.new("L", (105, 105), color=255)
    draw = ImageDraw.Draw(image)
    for (x0, y0), (x1, y1) in strokes:
        dx, dy = rng.integers(-jitter, jitter + 1, size=2)
        draw.line([(x0 + dx, y0 + dy), (x1 + dx, y1 + dy)], fill=0, width=3)
    return image


def _lake_runs(root, n_runs=2, ways=20, seed=0):
    """A synthetic all_runs folder: ``runNN/{training,test}/*.png`` and ``class_labels.txt``.

    Returns the folder and ``{run: {test path: training path}}`` (paths relative to the root).
    """
    rng = np.random.default_rng(seed)
    truth = {}
    for r in range(1, n_runs + 1):
        run = f"run{r:02d}"
        (root / run / "training").mkdir(parents=True)
        (root / run / "test").mkdir()
        strokes = [_strokes(rng) for _ in range(ways)]
        for c in range(ways):
            _draw(strokes[c], rng).save(root / run / "training" / f"class{c + 1:02d}.png")
        classes = rng.permutation(ways)
        lines, truth[run] = [], {}
        for i, c in enumerate(classes):
            _draw(strokes[c], rng).save(root / run / "test" / f"item{i + 1:02d}.png")
            test, train = f"{run}/test/item{i + 1:02d}.png", f"{run}/training/class{c + 1:02d}.png"
            lines.append(f"{test} {train}")
            truth[run][test] = train
        (root / run / LABELS_FILE).write_text("\n".join(lines) + "\n")
    return root, truth


def _zip(folder, path, prefix="all_runs/"):
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, prefix + file.relative_to(folder).as_posix())
    return path


def _fake_omniglot(root, n_characters=6, n_drawers=6, seed=0):
    """images_background/<alphabet>/<character>/<drawer>.png drawn from per-character strokes."""
    rng = np.random.default_rng(seed)
    for c in range(n_characters):
        folder = root / "images_background" / f"Alphabet{c % 2}" / f"character{c:02d}"
        folder.mkdir(parents=True)
        strokes = _strokes(rng)
        for d in range(n_drawers):
            _draw(strokes, rng).save(folder / f"{c:02d}_{d:02d}.png")
    return root


def test_reads_the_runs_from_a_folder_and_a_zip_identically(tmp_path):
    folder, truth = _lake_runs(tmp_path / "all_runs")
    runs = load_lake_runs(folder)
    zipped = load_lake_runs(_zip(folder, tmp_path / "all_runs.zip"))
    assert [r.name for r in runs] == [r.name for r in zipped] == ["run01", "run02"]
    for run, other in zip(runs, zipped):
        assert run.ways == 20 and run.x_support.shape == (20, 1, 28, 28) and run.x_query.shape == (20, 1, 28, 28)
        assert torch.equal(run.x_support, other.x_support) and torch.equal(run.x_query, other.x_query)
        assert torch.equal(run.y_query, other.y_query)
        # every query's label is the row of its class's training image, as class_labels.txt says
        for test, label in zip(run.test_files, run.y_query.tolist()):
            assert run.training_files[label] == truth[run.name][test]
        # the application's own preprocessing (resize to 28x28, strokes 1 on background 0)
        assert torch.equal(run.x_query[0], load_image(folder / run.test_files[0]))
        assert float(run.x_support.max()) > 0.5 and float(run.x_support[:, :, 0, 0].max()) == 0.0
        episode = run.episode()
        assert episode.y_support.tolist() == [list(range(20))] and episode.x_query.shape == (1, 20, 1, 28, 28)


def test_missing_file_names_it_and_the_line(tmp_path):
    folder, _ = _lake_runs(tmp_path / "all_runs", n_runs=1)
    (folder / "run01" / "test" / "item07.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"run01/test/item07\.png is missing \(named on line 7 of .*"
                                                 r"run01/class_labels\.txt"):
        load_lake_runs(folder)


def test_malformed_line_names_the_file_and_line(tmp_path):
    folder, _ = _lake_runs(tmp_path / "all_runs", n_runs=1)
    labels = folder / "run01" / LABELS_FILE
    lines = labels.read_text().splitlines()
    lines[2] = "run01/test/item03.png"
    labels.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"Malformed line 3 of .*run01/class_labels\.txt: 'run01/test/item03\.png'"):
        load_lake_runs(_zip(folder, tmp_path / "runs.zip"))


def test_corrupt_image_names_the_archive_member(tmp_path):
    folder, _ = _lake_runs(tmp_path / "all_runs", n_runs=1)
    (folder / "run01" / "training" / "class05.png").write_bytes(b"not a png")
    archive = _zip(folder, tmp_path / "runs.zip")
    with pytest.raises(ValueError, match=r"runs\.zip:all_runs/run01/training/class05\.png"):
        load_lake_runs(archive)


def test_no_runs_says_what_layout_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="runNN/class_labels.txt"):
        load_lake_runs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lake_runs(tmp_path / "nothing")


def _train_argv(data, out, *extra):
    return ["train", "--task", "omniglot", "--data", str(data), "--ways", "3", "--shots", "1", "--queries", "2",
            "--hidden", "8", "--meta-batch", "2", "--inner-steps", "2", "--iterations", "2", "--pretrain-epochs",
            "0", "--no-augment", "--eval-episodes", "4", "--output", str(out), "--no-progress", "--seed", "1",
            *extra]


_RUN_LINE = re.compile(r"^Lake (run\d\d) error (\d+\.\d\d)% \((\d+)/20\)$", re.M)
_OVERALL = re.compile(r"^Lake one-shot overall error (\d+\.\d\d)% \(mean over (\d+) runs\)$", re.M)


def _check_lake_output(text, results):
    per_run = _RUN_LINE.findall(text)
    assert [name for name, _, _ in per_run] == ["run01", "run02"]
    assert [r["run"] for r in results["runs"]] == ["run01", "run02"]
    for (_, percent, errors), row in zip(per_run, results["runs"]):
        assert row["queries"] == 20 and row["ways"] == 20 and int(errors) == row["errors"]
        assert float(percent) == pytest.approx(100 * row["error"], abs=0.01) and row["error"] == row["errors"] / 20
    (overall, n_runs), = _OVERALL.findall(text)
    assert int(n_runs) == results["n_runs"] == 2
    assert results["mean_error"] == pytest.approx(np.mean([r["error"] for r in results["runs"]]))
    assert float(overall) == pytest.approx(100 * results["mean_error"], abs=0.01)


def test_cli_evaluate_lake_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot")
    out = tmp_path / "run"
    # the recipe's prototype head is set from the support images: a 3-way model scores 20-way runs
    assert main(_train_argv(data, out, "--head", "prototype")) == 0
    folder, _ = _lake_runs(tmp_path / "all_runs")
    archive = _zip(folder, tmp_path / "all_runs.zip")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--lake-runs", str(archive), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "lake_runs.json").read_text())
    _check_lake_output(printed, results)
    assert results["source"] == str(archive) and results["checkpoint"] == str(out / "checkpoint.pt")

    # broken archives: one line on stderr naming the file, exit code 2, no traceback
    (folder / "run02" / "training" / "class03.png").unlink()
    assert main(["evaluate", "--checkpoint", str(out), "--lake-runs", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "run02/training/class03.png is missing" in err and "Traceback" not in err
    shutil.rmtree(folder / "run02")
    (folder / "run01" / LABELS_FILE).write_text("run01/test/item01.png run01/training/class01.png extra\n")
    assert main(["evaluate", "--checkpoint", str(out), "--lake-runs", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Malformed line 1" in err and "run01/class_labels.txt" in err and "Traceback" not in err


def test_linear_head_must_match_the_runs_ways(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot")
    out = tmp_path / "run"
    assert main(_train_argv(data, out, "--head", "linear")) == 0
    folder, _ = _lake_runs(tmp_path / "all_runs", n_runs=1)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--lake-runs", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "20-way" in err and "--ways 20" in err and "--head prototype" in err and "Traceback" not in err
    # bad runs fail before any training
    assert main(_train_argv(data, tmp_path / "o2", "--lake-runs", str(tmp_path / "none"))) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o2" / "checkpoint.pt").exists()
    # the paper's linear head trained 20-way (all 6 characters x 4 rotations) scores the 20-way runs
    argv = _train_argv(data, tmp_path / "wide", "--head", "linear", "--all-characters", "--lake-runs", str(folder))
    argv[argv.index("--ways") + 1] = "20"
    assert main(argv) == 0
    rows = json.loads((tmp_path / "wide" / "summary.json").read_text())["lake_runs"]["runs"]
    assert [r["run"] for r in rows] == ["run01"] and rows[0]["queries"] == 20


def test_train_on_all_characters_then_score_the_lake_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot")
    folder, _ = _lake_runs(tmp_path / "all_runs")
    out = tmp_path / "final"
    assert main(_train_argv(data, out, "--head", "prototype", "--all-characters", "--lake-runs", str(folder))) == 0
    captured = capsys.readouterr()
    assert "no held-out evaluation" in captured.err and "test accuracy" not in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["all_characters"] is True and summary["test"] is None
    assert "no held-out" in summary["held_out_evaluation"]
    _check_lake_output(captured.out, summary["lake_runs"])
    assert (out / "checkpoint.pt").is_file()

    # the checkpoint: no held-out episodes to evaluate on, but the Lake runs
    assert main(["evaluate", "--checkpoint", str(out), "--no-progress"]) == 2
    assert "--lake-runs" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--lake-runs", str(folder),
                 "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "ev" / "lake_runs.json").read_text())
    assert again["runs"] == summary["lake_runs"]["runs"]  # the same model and runs: the same errors
    _check_lake_output(capsys.readouterr().out, again)


def test_all_characters_trains_on_every_character(tmp_path, monkeypatch):
    from applications.meta_learning.trainer import TrainConfig, build_task_splits

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _fake_omniglot(tmp_path / "omniglot", n_characters=10)
    cfg = TrainConfig(task="omniglot", data=str(data), ways=3, queries=2).resolved()
    split = build_task_splits(cfg)
    everything = build_task_splits(TrainConfig(**{**cfg.to_dict(), "all_characters": True}).resolved())
    assert set(everything) == {"train"} and everything["train"].images.shape[0] == 10
    assert split["train"].images.shape[0] == 7  # the usual 70/10/20 split
    with pytest.raises(ValueError, match="all_characters"):
        TrainConfig(task="sinusoid", all_characters=True).resolved()
