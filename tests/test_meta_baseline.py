"""Tests of the supervised pre-training baseline and the confidence-interval helper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from applications.meta_learning.baseline import BaselineConfig, episode_features, evaluate_baseline, train_baseline
from applications.meta_learning.data import (
    Episode,
    OmniglotTasks,
    SinusoidTasks,
    default_omniglot_dir,
    fixed_episodes,
    load_omniglot,
    split_characters,
)
from applications.meta_learning.models import OmniglotCNN
from applications.meta_learning.stats import mean_confidence_interval

HAS_BUNDLED = (default_omniglot_dir() / "images_background_small1.zip").is_file()


pytestmark = pytest.mark.usefixtures("single_thread")  # fixture in conftest.py


def _synthetic_characters(n_characters: int, n_drawers: int, seed: int) -> torch.Tensor:
    """Stroke-like characters: a few random line segments per character; drawers shift and thin them."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n_characters, n_drawers, 1, 28, 28)
    steps = torch.linspace(0, 1, 40)
    for c in range(n_characters):
        ends = 4 + 20 * torch.rand(4, 2, 2, generator=generator)  # 4 segments, (start, end), (row, col)
        points = ends[:, 0, None, :] + steps[None, :, None] * (ends[:, 1, None, :] - ends[:, 0, None, :])
        for d in range(n_drawers):
            shift = torch.randint(-1, 2, (2,), generator=generator)
            jitter = 0.5 * torch.randn(points.shape, generator=generator).cumsum(1) / 6
            pixels = (points + shift + jitter).round().long().clamp(0, 27).reshape(-1, 2)
            keep = torch.rand(pixels.shape[0], generator=generator) > 0.2
            images[c, d, 0, pixels[keep, 0], pixels[keep, 1]] = 1.0
    return images


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------
def test_baseline_end_to_end_beats_chance_on_held_out_synthetic_characters():
    torch.manual_seed(0)
    images = _synthetic_characters(n_characters=40, n_drawers=8, seed=0)
    splits = split_characters(40, seed=0, fractions=(0.75, 0.0, 0.25))
    config = BaselineConfig(epochs=3, batch_size=32, lr=1e-2, hidden=16, seed=0)
    model, stats = train_baseline(images[splits["train"]], config, progress=False)
    assert stats["num_classes"] == 30 * 4 and stats["num_images"] == 30 * 4 * 8
    assert stats["wall_time_s"] > 0 and len(stats["loss_history"]) == 3
    assert stats["loss_history"][-1] < stats["loss_history"][0]
    held_out = OmniglotTasks(images[splits["test"]], ways=5, shots=1, queries=5)
    episodes = fixed_episodes(held_out, 100, seed=1, batch_size=50)
    torch.manual_seed(0)
    untrained = evaluate_baseline(OmniglotCNN(5, hidden=16), episodes)["accuracy"]
    for head in ("prototype", "finetune"):
        result = evaluate_baseline(model, episodes, head=head, finetune_steps=50)
        assert result["n_episodes"] == 100 and len(result["accuracies"]) == 100
        # Chance is 20%; the pre-trained features must be far above it and above random features.
        assert result["accuracy"] > 0.6, (head, result["accuracy"])
        assert result["accuracy"] > untrained + 0.15, (head, result["accuracy"], untrained)
        assert 0 < result["ci95"] < 0.1


@pytest.mark.skipif(not HAS_BUNDLED, reason="bundled small Omniglot archives not present")
def test_baseline_on_bundled_omniglot_beats_chance_and_untrained_features(tmp_path):
    characters = load_omniglot(cache_dir=tmp_path)
    splits = split_characters(len(characters), seed=0)
    train = characters.images[splits["train"][:40]]  # a small slice keeps this to seconds
    model, _ = train_baseline(train, BaselineConfig(epochs=3, batch_size=64, hidden=32, seed=0), progress=False)
    held_out = OmniglotTasks(characters.images[splits["test"]], ways=5, shots=1, queries=5)
    episodes = fixed_episodes(held_out, 100, seed=1)
    trained = evaluate_baseline(model, episodes)["accuracy"]
    torch.manual_seed(0)
    untrained = evaluate_baseline(OmniglotCNN(5, hidden=32), episodes)["accuracy"]
    assert trained > 0.45  # chance: 0.2
    assert trained > untrained + 0.1  # pre-training, not the architecture alone, does the work


# --------------------------------------------------------------------------------------
# Training details
# --------------------------------------------------------------------------------------
def test_training_is_deterministic_and_leaves_global_rng_alone():
    images = torch.rand(4, 3, 1, 28, 28)
    config = BaselineConfig(epochs=2, batch_size=8, hidden=4, seed=7)
    state = torch.random.get_rng_state()
    first, stats_first = train_baseline(images, config, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, stats_second = train_baseline(images, config, progress=False)
    assert stats_first["loss_history"] == stats_second["loss_history"]
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    other, _ = train_baseline(images, BaselineConfig(epochs=2, batch_size=8, hidden=4, seed=8), progress=False)
    assert not torch.equal(other.head.weight, first.head.weight)


def test_rotations_are_separate_classes():
    images = torch.rand(3, 2, 1, 28, 28)
    _, with_rotations = train_baseline(images, BaselineConfig(epochs=1, hidden=4), progress=False)
    _, without = train_baseline(images, BaselineConfig(epochs=1, hidden=4), rotations=False, progress=False)
    assert with_rotations["num_classes"] == 12 and without["num_classes"] == 3
    from applications.meta_learning.baseline import _rotated_batch

    index = torch.arange(3 * 4 * 2)
    batch, labels = _rotated_batch(images, index, 4)
    assert torch.equal(labels, index // 2)
    # Flat index 2*5 + 1 = 11 -> character 1, rotation 1, drawer 1.
    assert torch.equal(batch[11], torch.rot90(images[1, 1], 1, dims=(-2, -1)))


# --------------------------------------------------------------------------------------
# Evaluation details
# --------------------------------------------------------------------------------------
def _episodes(ways: int = 4, n: int = 6) -> list[Episode]:
    tasks = OmniglotTasks(torch.rand(10, 6, 1, 28, 28), ways=ways, shots=2, queries=3)
    return fixed_episodes(tasks, n, seed=0, batch_size=n)


def test_prototype_head_matches_a_per_query_reference():
    torch.manual_seed(0)
    model = OmniglotCNN(4, hidden=8).eval()
    episodes = _episodes()
    result = evaluate_baseline(model, episodes, head="prototype")
    episode = episodes[0]
    expected = []
    for b in range(episode.batch_size):
        with torch.no_grad():  # one task through the network at once: its own batch statistics
            feats = model.features(torch.cat([episode.x_support[b], episode.x_query[b]])).double().numpy()
        support, query = feats[:8], feats[8:]
        unit = support / np.linalg.norm(support, axis=1, keepdims=True)
        labels = episode.y_support[b].numpy()
        prototypes = np.stack([unit[labels == c].mean(0) for c in range(4)])
        correct = 0
        for q, y in zip(query, episode.y_query[b].numpy()):
            cosine = prototypes @ q / (np.linalg.norm(prototypes, axis=1) * np.linalg.norm(q))
            correct += int(np.argmax(cosine) == y)
        expected.append(correct / len(query))
    assert np.allclose(result["accuracies"], expected)


@pytest.mark.parametrize("head", ["prototype", "finetune"])
def test_batched_evaluation_equals_one_episode_at_a_time(head):
    torch.manual_seed(0)
    model = OmniglotCNN(4, hidden=8)
    batched = _episodes()
    singles = [Episode(*(t[b : b + 1] for t in batched[0])) for b in range(batched[0].batch_size)]
    a = evaluate_baseline(model, batched, head=head, finetune_steps=20)
    b = evaluate_baseline(model, singles, head=head, finetune_steps=20)
    assert a["accuracies"] == b["accuracies"]
    support, query = episode_features(model, batched[0])
    with torch.no_grad():
        whole = model.features(torch.cat([batched[0].x_support[2], batched[0].x_query[2]]))
    assert torch.allclose(torch.cat([support[2], query[2]]), whole, atol=1e-5)


def test_finetune_head_fits_the_support_set():
    # Features that separate classes perfectly: the fitted head must classify the support itself.
    from applications.meta_learning.baseline import _finetune_predictions

    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(2, 5, 16, generator=generator)
    labels = torch.arange(5).repeat(2, 2)  # [2, 10]
    noise = 0.1 * torch.randn(2, 10, 16, generator=generator)
    support = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, 16)) + noise
    predictions = _finetune_predictions(support, labels, support, 5, steps=100, lr=0.05)
    assert torch.equal(predictions, labels)
    loss = F.cross_entropy(torch.zeros(5), torch.tensor(0))
    assert math.isclose(float(loss), math.log(5), rel_tol=1e-6)  # zero-initialised head starts at chance


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        BaselineConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        BaselineConfig(batch_size=1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        BaselineConfig(lr=-1.0)
    with pytest.raises(ValueError, match="Unknown baseline head 'knn'"):
        BaselineConfig(head="knn")
    with pytest.raises(ValueError, match="n_characters, n_drawers"):
        train_baseline(torch.rand(3, 1, 28, 28), BaselineConfig(epochs=1), progress=False)
    model = OmniglotCNN(4, hidden=4)
    with pytest.raises(ValueError, match="Unknown baseline head"):
        evaluate_baseline(model, _episodes(), head="knn")
    with pytest.raises(ValueError, match="at least one episode"):
        evaluate_baseline(model, [])
    with pytest.raises(ValueError, match="classification episodes"):
        evaluate_baseline(model, fixed_episodes(SinusoidTasks(shots=2, queries=2), 2, seed=0))


# --------------------------------------------------------------------------------------
# Confidence intervals
# --------------------------------------------------------------------------------------
def test_mean_confidence_interval_matches_numpy():
    values = np.random.default_rng(0).uniform(size=600)
    mean, half_width = mean_confidence_interval(torch.tensor(values))
    assert math.isclose(mean, values.mean(), rel_tol=1e-12)
    assert math.isclose(half_width, 1.96 * values.std(ddof=1) / math.sqrt(600), rel_tol=1e-12)
    assert mean_confidence_interval([0.25, 0.75]) == pytest.approx((0.5, 1.96 * math.sqrt(0.125) / math.sqrt(2)))
    single_mean, single_width = mean_confidence_interval([0.4])
    assert single_mean == 0.4 and math.isnan(single_width)
    with pytest.raises(ValueError, match="at least one value"):
        mean_confidence_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_confidence_interval([0.1, float("nan")])
