"""Tests of applications.meta_learning.data: Omniglot loading, splits and episode samplers."""

from __future__ import annotations

import io
import math
import os
import pathlib
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from applications.meta_learning import data as meta_data
from applications.meta_learning.data import (
    OMNIGLOT_ENV_VAR,
    Episode,
    OmniglotCharacters,
    OmniglotTasks,
    SinusoidTasks,
    build_omniglot_splits,
    fixed_episodes,
    load_image,
    load_omniglot,
    resolve_omniglot_root,
    split_characters,
)

BUNDLED = meta_data.default_omniglot_dir()
HAS_BUNDLED = (BUNDLED / "images_background_small1.zip").is_file() and (
    BUNDLED / "images_background_small2.zip"
).is_file()


# --------------------------------------------------------------------------------------
# Fake Omniglot in the dataset authors' layout, written with PIL
# --------------------------------------------------------------------------------------
def _drawing(character_index: int, drawer: int) -> Image.Image:
    """105x105 black-on-white drawing: a bar whose row encodes the character, column the drawer."""
    pixels = np.full((105, 105), 255, dtype=np.uint8)
    row = 4 + 8 * character_index
    col = 4 + 8 * drawer
    pixels[row : row + 8, :] = 0
    pixels[:, col : col + 4] = 0
    return Image.fromarray(pixels, mode="L").convert("1")  # 1-bit, like the real PNGs


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_files(top: str, alphabets: dict[str, int], drawers: int, offset: int = 0) -> dict[str, bytes]:
    """``{relative path: png bytes}`` for ``top/<Alphabet>/characterNN/<id>_<dd>.png``."""
    files, index = {}, offset
    for alphabet, n_characters in alphabets.items():
        for c in range(1, n_characters + 1):
            for d in range(1, drawers + 1):
                files[f"{top}/{alphabet}/character{c:02d}/{index:04d}_{d:02d}.png"] = _png_bytes(
                    _drawing(index % 12, d - 1)
                )
            index += 1
    return files


def _write_folder(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for relative, payload in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)


def _write_zip(path: pathlib.Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for relative, payload in files.items():
            archive.writestr(relative, payload)


ALPHABETS = {"Alpha": 3, "Beta": 2}


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------
def test_load_image_inverts_resizes_and_scales(tmp_path):
    # Black square on the top-left quarter of a white page.
    pixels = np.full((105, 105), 255, dtype=np.uint8)
    pixels[:52, :52] = 0
    path = tmp_path / "square.png"
    Image.fromarray(pixels, mode="L").save(path)
    image = load_image(path)
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    # LANCZOS rings slightly near the edge of the square, so compare away from it.
    assert torch.allclose(image[0, :11, :11], torch.ones(11, 11), atol=0.02)  # strokes -> 1
    assert torch.allclose(image[0, 17:, 17:], torch.zeros(11, 11), atol=0.02)  # background -> 0
    assert float(image[0, :14, :14].mean()) > 0.9 and float(image[0, 14:, 14:].mean()) < 0.05
    # Bytes, file objects and str paths go through the same preprocessing.
    assert torch.equal(load_image(path.read_bytes()), image)
    with open(path, "rb") as stream:
        assert torch.equal(load_image(stream), image)
    assert torch.equal(load_image(str(path)), image)


def test_load_image_reads_one_bit_png_and_rgb():
    gray = np.full((105, 105), 255, dtype=np.uint8)
    gray[40:60, :] = 0
    one_bit = load_image(_png_bytes(Image.fromarray(gray, mode="L").convert("1")))
    rgb = load_image(_png_bytes(Image.fromarray(gray, mode="L").convert("RGB")))
    assert torch.allclose(one_bit, rgb)
    assert one_bit[0, 14].min() > 0.99 and one_bit[0, 0].max() < 0.01


def test_load_image_corrupt_file_names_it(tmp_path):
    path = tmp_path / "broken_0001.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="broken_0001.png"):
        load_image(path)
    with pytest.raises(ValueError, match="member.png"):
        load_image(b"garbage", name="archive.zip:member.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------
# Locating and loading Omniglot
# --------------------------------------------------------------------------------------
def test_loads_standard_folder_and_zip_identically(tmp_path, cache_dir):
    files = _fake_files("images_background", ALPHABETS, drawers=4)
    folder_root, zip_root = tmp_path / "extracted", tmp_path / "zipped"
    _write_folder(folder_root, files)
    zip_root.mkdir()
    _write_zip(zip_root / "images_background.zip", files)

    from_parent = load_omniglot(folder_root, cache=False)
    from_folder = load_omniglot(folder_root / "images_background", cache=False)
    from_zip_dir = load_omniglot(zip_root, cache=False)
    from_zip_file = load_omniglot(zip_root / "images_background.zip", cache_dir=cache_dir)
    expected_names = [f"Alpha/character{c:02d}" for c in (1, 2, 3)] + [f"Beta/character{c:02d}" for c in (1, 2)]
    for loaded in (from_parent, from_folder, from_zip_dir, from_zip_file):
        assert loaded.names == expected_names
        assert loaded.images.shape == (5, 4, 1, 28, 28)
        assert torch.equal(loaded.images, from_parent.images)
    # The pixels are load_image of the right file: character 2 of Alpha, drawer 3.
    reference = load_image(folder_root / "images_background/Alpha/character02/0001_03.png")
    assert torch.equal(from_zip_dir.images[1, 2], reference)


def test_background_and_evaluation_are_combined_and_duplicates_dropped(tmp_path, cache_dir):
    _write_zip(
        tmp_path / "images_background_small1.zip",
        _fake_files("images_background_small1", {"Greek": 2, "Alpha": 1}, 3),
    )
    _write_zip(
        tmp_path / "images_background_small2.zip",
        _fake_files("images_background_small2", {"Greek": 2, "Beta": 2}, 3, offset=5),
    )
    _write_folder(tmp_path, _fake_files("images_evaluation", {"Gamma": 1}, 3, offset=9))
    loaded = load_omniglot(tmp_path, cache_dir=cache_dir)
    assert loaded.names == [
        "Alpha/character01", "Beta/character01", "Beta/character02",
        "Gamma/character01", "Greek/character01", "Greek/character02",
    ]
    assert loaded.alphabets == ["Alpha", "Beta", "Gamma", "Greek"]
    # Greek comes from the first archive by name (small1), whose first Greek character is index 0.
    assert torch.equal(loaded.images[4, 0], load_image(_png_bytes(_drawing(0, 0))))


def test_zip_and_its_extracted_folder_are_not_counted_twice(tmp_path):
    files = _fake_files("images_background", ALPHABETS, drawers=2)
    _write_zip(tmp_path / "images_background.zip", files)
    _write_folder(tmp_path, files)
    assert len(load_omniglot(tmp_path, cache=False)) == 5


def test_cache_is_written_atomically_reused_and_invalidated(tmp_path, cache_dir, monkeypatch):
    archive = tmp_path / "images_background.zip"
    _write_zip(archive, _fake_files("images_background", ALPHABETS, drawers=3))
    first = load_omniglot(tmp_path, cache_dir=cache_dir)
    cached = list(cache_dir.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt"  # no temp files left behind

    def must_not_decode(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(meta_data, "_read_characters", must_not_decode)
    second = load_omniglot(tmp_path, cache_dir=cache_dir)
    assert second.names == first.names and torch.equal(second.images, first.images)
    monkeypatch.undo()

    # A changed archive (size/mtime) gets a new cache entry.
    _write_zip(archive, _fake_files("images_background", {"Alpha": 1}, drawers=3))
    os.utime(archive, ns=(1, 1))
    third = load_omniglot(tmp_path, cache_dir=cache_dir)
    assert third.names == ["Alpha/character01"]
    assert len(list(cache_dir.iterdir())) == 2

    # A corrupt cache file is ignored and rebuilt.
    for path in cache_dir.iterdir():
        path.write_bytes(b"not a torch file")
    assert load_omniglot(tmp_path, cache_dir=cache_dir).names == ["Alpha/character01"]


def test_uneven_drawer_counts_keep_the_minimum_and_need_two(tmp_path):
    files = _fake_files("images_background", {"Alpha": 2}, drawers=4)
    del files["images_background/Alpha/character02/0001_04.png"]
    _write_folder(tmp_path / "a", files)
    assert load_omniglot(tmp_path / "a", cache=False).images.shape == (2, 3, 1, 28, 28)
    for d in (2, 3):
        del files[f"images_background/Alpha/character02/0001_{d:02d}.png"]
    _write_folder(tmp_path / "b", files)
    with pytest.raises(ValueError, match="at least 2 drawings.*Alpha/character02"):
        load_omniglot(tmp_path / "b", cache=False)


def test_bad_paths_raise_with_the_download_hint(tmp_path, monkeypatch):
    monkeypatch.delenv(OMNIGLOT_ENV_VAR, raising=False)
    hint = r"images_background\.zip.*github\.com/brendenlake/omniglot"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*" + hint):
        resolve_omniglot_root(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=hint):
        resolve_omniglot_root(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=hint):
        load_omniglot(tmp_path / "empty")
    monkeypatch.setenv(OMNIGLOT_ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=OMNIGLOT_ENV_VAR):
        resolve_omniglot_root(None)


def test_resolution_order_path_then_env_then_default(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        root.mkdir()
        _write_zip(root / "images_background.zip", _fake_files("images_background", {"Alpha": 1}, 2))
    monkeypatch.setattr(meta_data, "default_omniglot_dir", lambda: tmp_path / "no_default")
    monkeypatch.delenv(OMNIGLOT_ENV_VAR, raising=False)
    assert resolve_omniglot_root(None) is None
    with pytest.raises(FileNotFoundError, match="IMPLICITDIFF_OMNIGLOT is unset"):
        load_omniglot(None)
    monkeypatch.setattr(meta_data, "default_omniglot_dir", lambda: second)
    assert resolve_omniglot_root(None) == second
    monkeypatch.setenv(OMNIGLOT_ENV_VAR, str(first))
    assert resolve_omniglot_root(None) == first
    assert resolve_omniglot_root(second) == second


def test_default_dir_is_shared_folder_beside_repo():
    repo_root = pathlib.Path(meta_data.__file__).resolve().parents[2]
    assert (repo_root / "applications").is_dir()
    assert meta_data.default_omniglot_dir() == repo_root.parent / "shared" / "data" / "omniglot"


@pytest.mark.skipif(not HAS_BUNDLED, reason="bundled small Omniglot archives not present")
def test_bundled_small_background_sets(cache_dir):
    loaded = load_omniglot(BUNDLED, cache_dir=cache_dir)
    assert loaded.images.shape == (242, 20, 1, 28, 28)
    assert len(set(loaded.names)) == 242 and loaded.names == sorted(loaded.names)
    assert len(loaded.alphabets) == 8
    assert sum(name.startswith("Greek/") for name in loaded.names) == 24
    assert sum(name.startswith("Latin/") for name in loaded.names) == 26
    # Strokes are a minority of pixels; background 0 after inversion.
    assert 0.03 < float(loaded.images.mean()) < 0.2
    assert loaded.images.min() >= 0 and loaded.images.max() <= 1


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------
def test_split_characters_disjoint_covering_and_seeded():
    splits = split_characters(242, seed=3)
    sizes = {name: len(index) for name, index in splits.items()}
    assert sizes == {"train": 169, "val": 24, "test": 49}
    everything = torch.cat(list(splits.values()))
    assert torch.equal(everything.sort().values, torch.arange(242))
    again = split_characters(242, seed=3)
    assert all(torch.equal(splits[k], again[k]) for k in splits)
    assert not torch.equal(split_characters(242, seed=4)["train"], splits["train"])
    custom = split_characters(242, seed=0, fractions=(180 / 242, 0.0, 62 / 242))
    assert [len(custom[k]) for k in ("train", "val", "test")] == [180, 0, 62]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fractions": (0.5, 0.5)}, "three"),
        ({"fractions": (0.7, 0.2, 0.2)}, "sum to 1"),
        ({"fractions": (1.2, -0.1, -0.1)}, "non-negative"),
    ],
)
def test_split_characters_rejects_bad_fractions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_characters(10, **kwargs)


def test_split_characters_rejects_empty_split():
    with pytest.raises(ValueError, match="'val' split .* empty"):
        split_characters(3, fractions=(0.8, 0.1, 0.1))


# --------------------------------------------------------------------------------------
# Episode samplers
# --------------------------------------------------------------------------------------
def _tagged_images(n_characters: int, n_drawers: int, size: int = 8) -> torch.Tensor:
    """Images whose pixels encode (character, drawer) and a corner marker that reveals rotation."""
    images = torch.zeros(n_characters, n_drawers, 1, size, size)
    for c in range(n_characters):
        for d in range(n_drawers):
            images[c, d] = 1.0 + c + d / 100.0
            images[c, d, 0, 0, 0] = -1.0  # top-left marker
    return images


def _decode(image: torch.Tensor) -> tuple[int, int, int]:
    """(character, drawer, quarter turns) of a tagged image."""
    centre = float(image[0, 3, 3])
    character = int(math.floor(centre)) - 1
    drawer = round((centre - math.floor(centre)) * 100)
    corners = [image[0, 0, 0], image[0, -1, 0], image[0, -1, -1], image[0, 0, -1]]
    turns = [i for i, value in enumerate(corners) if value == -1.0]
    assert len(turns) == 1
    return character, drawer, turns[0]  # rot90 (counter-clockwise) moves top-left down the left edge


@pytest.mark.parametrize("rotations", [True, False])
def test_omniglot_tasks_episode_structure(rotations):
    images = _tagged_images(n_characters=7, n_drawers=6)
    tasks = OmniglotTasks(images, ways=4, shots=2, queries=3, rotations=rotations)
    assert tasks.num_classes == (28 if rotations else 7)
    episode = tasks.sample(16, torch.Generator().manual_seed(0))
    assert isinstance(episode, Episode)
    assert episode.x_support.shape == (16, 8, 1, 8, 8) and episode.x_query.shape == (16, 12, 1, 8, 8)
    assert episode.y_support.dtype == torch.int64 and episode.y_query.dtype == torch.int64
    seen_turns = set()
    for b in range(16):
        # Balanced labels 0..N-1.
        assert torch.equal(episode.y_support[b].bincount(minlength=4), torch.full((4,), 2))
        assert torch.equal(episode.y_query[b].bincount(minlength=4), torch.full((4,), 3))
        classes = {}
        examples = torch.cat([episode.x_support[b], episode.x_query[b]])
        for x, y in zip(examples, torch.cat([episode.y_support[b], episode.y_query[b]])):
            character, drawer, turns = _decode(x)
            classes.setdefault(int(y), []).append((character, turns, drawer))
        identities = set()
        for members in classes.values():
            assert len({(c, t) for c, t, _ in members}) == 1  # one (character, rotation) per label
            assert len({d for _, _, d in members}) == len(members) == 5  # distinct drawers
            identities.add(members[0][:2])
            seen_turns.add(members[0][1])
        assert len(identities) == 4  # distinct classes
    assert seen_turns == ({0, 1, 2, 3} if rotations else {0})


def test_omniglot_tasks_labels_are_permuted_and_seeded():
    images = _tagged_images(n_characters=10, n_drawers=4)
    tasks = OmniglotTasks(images, ways=5, shots=1, queries=1, rotations=False)
    first = tasks.sample(50, torch.Generator().manual_seed(1))
    again = tasks.sample(50, torch.Generator().manual_seed(1))
    other = tasks.sample(50, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.x_support, other.x_support)
    # Label 0 is not always the smallest character index: the class -> label map is random.
    label0_chars = [_decode(first.x_support[b, 0])[0] for b in range(50)]
    smallest = [min(_decode(first.x_support[b, i])[0] for i in range(5)) for b in range(50)]
    assert label0_chars != smallest


def test_omniglot_tasks_errors():
    images = torch.zeros(3, 20, 1, 28, 28)
    with pytest.raises(ValueError, match="ways=13 exceeds the 12 classes"):
        OmniglotTasks(images, ways=13, shots=1, queries=1)
    with pytest.raises(ValueError, match="ways=4 exceeds the 3 classes"):
        OmniglotTasks(images, ways=4, shots=1, queries=1, rotations=False)
    with pytest.raises(ValueError, match="shots \\+ queries = 5 \\+ 16 = 21 exceeds the 20 drawers"):
        OmniglotTasks(images, ways=5, shots=5, queries=16)
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        OmniglotTasks(images, ways=5, shots=0, queries=1)
    with pytest.raises(ValueError, match="n_characters, n_drawers"):
        OmniglotTasks(images[0], ways=2, shots=1, queries=1)


def test_build_omniglot_splits_never_share_characters():
    images = _tagged_images(n_characters=30, n_drawers=5)
    characters = OmniglotCharacters(images=images, names=[f"A/c{i:02d}" for i in range(30)])
    splits = build_omniglot_splits(characters=characters, seed=0, ways=3, shots=1, queries=2)
    assert set(splits) == {"train", "val", "test"}
    assert {k: v.num_classes for k, v in splits.items()} == {"train": 84, "val": 12, "test": 24}
    generator = torch.Generator().manual_seed(0)
    seen = {}
    for name, tasks in splits.items():
        episode = tasks.sample(40, generator)
        # The pixels encode the character's index in the full set, so splits can be compared.
        seen[name] = {_decode(x)[0] for x in torch.cat([episode.x_support, episode.x_query], 1).flatten(0, 1)}
        assert seen[name] <= set(split_characters(30, seed=0)[name].tolist())
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_sinusoid_tasks_points_lie_on_one_sinusoid_per_task():
    tasks = SinusoidTasks(shots=10, queries=7)
    episode = tasks.sample(8, torch.Generator().manual_seed(0))
    assert episode.x_support.shape == (8, 10, 1) and episode.y_query.shape == (8, 7, 1)
    assert episode.x_support.abs().max() <= 5.0
    for b in range(8):
        # A sin(x - p) = a sin x + c cos x: fit (a, c) on the support, predict the query exactly.
        xs, ys = episode.x_support[b, :, 0].double(), episode.y_support[b, :, 0].double()
        design = torch.stack([xs.sin(), xs.cos()], 1)
        coef = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution
        xq = episode.x_query[b, :, 0].double()
        predicted = torch.stack([xq.sin(), xq.cos()], 1) @ coef
        assert torch.allclose(predicted[:, 0], episode.y_query[b, :, 0].double(), atol=1e-5)
        amplitude = float(coef.norm())
        assert 0.1 - 1e-5 <= amplitude <= 5.0 + 1e-5
        phase = math.atan2(-float(coef[1]), float(coef[0]))  # a = A cos p, c = -A sin p
        assert -1e-5 <= phase <= math.pi + 1e-5
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidTasks(shots=1, queries=1, amplitude=(5.0, 0.1))


def test_fixed_episodes_are_deterministic_and_sized():
    tasks = OmniglotTasks(_tagged_images(6, 5), ways=3, shots=1, queries=2)
    first = fixed_episodes(tasks, 23, seed=5, batch_size=10)
    again = fixed_episodes(tasks, 23, seed=5, batch_size=10)
    assert [e.batch_size for e in first] == [10, 10, 3]
    assert all(torch.equal(a, b) for ea, eb in zip(first, again) for a, b in zip(ea, eb))
    other = fixed_episodes(tasks, 23, seed=6, batch_size=10)
    assert not torch.equal(first[0].x_support, other[0].x_support)
    sinusoids = fixed_episodes(SinusoidTasks(shots=5, queries=5), 4, seed=0, batch_size=3)
    assert [e.batch_size for e in sinusoids] == [3, 1]
