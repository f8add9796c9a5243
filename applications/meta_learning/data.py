"""Few-shot task data: Omniglot loading, character splits and episode samplers.

Omniglot (Lake et al., 2015) comes from the dataset authors' public repository
https://github.com/brendenlake/omniglot as zip archives, each holding
``<archive stem>/<Alphabet>/<character>/<drawer>.png`` (105x105 black-on-white
PNGs, one per drawer, 20 drawers per character). This module reads any of

* the full archives ``images_background.zip`` / ``images_evaluation.zip``,
* the "small" background archives ``images_background_small1.zip`` /
  ``images_background_small2.zip`` (bundled with this repository's shared
  data; Greek and Latin appear in both and are de-duplicated by name), and
* the folders those archives extract to,

preprocesses every image with :func:`load_image` (the single preprocessing
function), caches the result under ``~/.cache/implicitdiff/`` and provides
N-way K-shot episode samplers (:class:`OmniglotTasks`, :class:`SinusoidTasks`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
import tempfile
import zipfile
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import CheckpointError, load_checkpoint

__all__ = [
    "OMNIGLOT_ENV_VAR",
    "OMNIGLOT_SOURCE_URL",
    "IMAGE_SIZE",
    "Episode",
    "OmniglotCharacters",
    "OmniglotTasks",
    "SinusoidTasks",
    "build_omniglot_splits",
    "default_omniglot_dir",
    "fixed_episodes",
    "load_image",
    "load_omniglot",
    "omniglot_cache_dir",
    "resolve_omniglot_root",
    "split_characters",
]

OMNIGLOT_ENV_VAR = "IMPLICITDIFF_OMNIGLOT"
OMNIGLOT_SOURCE_URL = "https://github.com/brendenlake/omniglot"
IMAGE_SIZE = 28
# Bump when load_image or the stored layout changes, so stale caches are ignored.
_CACHE_FORMAT_VERSION = 1
_ARCHIVE_PREFIX = "images_"
_EXPECTED_LAYOUT = (
    "the dataset authors' archives images_background.zip / images_evaluation.zip "
    "(or images_background_small1.zip / images_background_small2.zip), or the folders they "
    "extract to, laid out as images_background/<Alphabet>/<character>/<drawer>.png"
)

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------
# Locating the data
# ----------------------------------------------------------------------------------------
def default_omniglot_dir() -> pathlib.Path:
    """Return the default Omniglot location, ``<repo root>/../shared/data/omniglot``.

    The repository root is the parent of the ``applications/`` package.

    Examples
    --------
    >>> default_omniglot_dir().name
    'omniglot'
    """
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "omniglot"


def _is_character_folder_tree(folder: pathlib.Path) -> bool:
    """True if ``folder/<Alphabet>/<character>/*.png`` exists (an extracted archive)."""
    for alphabet in folder.iterdir():
        if not alphabet.is_dir():
            continue
        for character in alphabet.iterdir():
            if character.is_dir() and any(character.glob("*.png")):
                return True
    return False


def _find_sources(root: pathlib.Path) -> list[pathlib.Path]:
    """Archives and extracted folders holding Omniglot under ``root`` (sorted by name).

    ``root`` may itself be one archive, one extracted folder, or a folder that holds
    archives and/or extracted folders named ``images_*``. An archive wins over an
    extracted folder of the same name (the archive is complete by construction).
    """
    if root.is_file():
        return [root] if zipfile.is_zipfile(root) else []
    if not root.is_dir():
        return []
    if _is_character_folder_tree(root):
        return [root]
    archives = {p.stem: p for p in root.glob(f"{_ARCHIVE_PREFIX}*.zip") if zipfile.is_zipfile(p)}
    folders = {
        p.name: p
        for p in root.glob(f"{_ARCHIVE_PREFIX}*")
        if p.is_dir() and p.name not in archives and _is_character_folder_tree(p)
    }
    found = {**folders, **archives}
    return [found[name] for name in sorted(found)]


def _missing_data_message(what: str) -> str:
    return (
        f"{what} holds no Omniglot data. Expected {_EXPECTED_LAYOUT}. "
        f"The data comes from the dataset authors' public repository {OMNIGLOT_SOURCE_URL} "
        f"(download the archives from its python/ folder)."
    )


def resolve_omniglot_root(path: PathLike | None = None) -> pathlib.Path | None:
    """Find the Omniglot data: ``path``, else ``$IMPLICITDIFF_OMNIGLOT``, else the default dir.

    Parameters
    ----------
    path
        An archive, an extracted ``images_*`` folder, or a folder holding such
        archives/folders. ``None`` falls back to the environment variable
        :data:`OMNIGLOT_ENV_VAR` and then to :func:`default_omniglot_dir`.

    Returns
    -------
    pathlib.Path or None
        The resolved location, or ``None`` if no location was given and the
        default directory holds no Omniglot data.

    Raises
    ------
    FileNotFoundError
        If ``path`` (or the environment variable) names a location that does
        not exist or holds no Omniglot archive/folder; the message describes the
        expected archives and layout and where the data comes from.

    Examples
    --------
    >>> root = resolve_omniglot_root()  # None when the bundled data is absent
    """
    explicit: list[tuple[str, str]] = []
    if path is not None:
        explicit.append((str(path), f"The given Omniglot path {str(path)!r}"))
    env_value = os.environ.get(OMNIGLOT_ENV_VAR)
    if path is None and env_value:
        explicit.append((env_value, f"${OMNIGLOT_ENV_VAR}={env_value!r}"))
    for value, what in explicit:
        candidate = pathlib.Path(value).expanduser()
        if not candidate.exists():
            raise FileNotFoundError(_missing_data_message(f"{what} does not exist; it"))
        if not _find_sources(candidate):
            raise FileNotFoundError(_missing_data_message(what))
        return candidate
    default = default_omniglot_dir()
    if default.is_dir() and _find_sources(default):
        return default
    return None


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------
def load_image(source: PathLike | bytes | BinaryIO, *, name: str | None = None) -> torch.Tensor:
    """Load one Omniglot drawing as a ``(1, 28, 28)`` float32 tensor, strokes 1, background 0.

    This is the single preprocessing function used by :func:`load_omniglot`:
    the PNG is converted to 8-bit grayscale, resized to 28x28 with PIL's
    LANCZOS filter (anti-aliased, as in the MAML/iMAML reference code), scaled
    to ``[0, 1]`` and inverted, since Omniglot PNGs are black strokes on white.

    Parameters
    ----------
    source
        A file path, the raw PNG bytes, or a binary file object.
    name
        Name used in error messages (defaults to the path or the file object's
        ``name``).

    Raises
    ------
    ValueError
        If the image cannot be decoded; the message names the file.

    Examples
    --------
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("L", (105, 105), color=255).save(buffer, format="PNG")
    >>> load_image(buffer.getvalue()).shape  # a blank (all-white) page
    torch.Size([1, 28, 28])
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        stream: PathLike | BinaryIO = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        stream = source
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Image file {label!r} does not exist.")
    else:
        label = name or str(getattr(source, "name", "<file object>"))
        stream = source
    try:
        with Image.open(stream) as image:
            gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read image {label!r}: {error}") from error
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    return torch.from_numpy(1.0 - pixels).unsqueeze(0)


# ----------------------------------------------------------------------------------------
# Loading the whole dataset
# ----------------------------------------------------------------------------------------
@dataclass
class OmniglotCharacters:
    """Preprocessed Omniglot characters.

    Attributes
    ----------
    images
        float32 tensor ``[n_characters, n_drawers, 1, 28, 28]`` (strokes 1,
        background 0), characters ordered by :attr:`names`.
    names
        ``"alphabet/character"`` names, sorted.

    Examples
    --------
    >>> chars = OmniglotCharacters(torch.zeros(2, 20, 1, 28, 28), ["Greek/character01", "Latin/character01"])
    >>> len(chars), chars.num_drawers, chars.alphabets
    (2, 20, ['Greek', 'Latin'])
    """

    images: torch.Tensor
    names: list[str]

    def __post_init__(self) -> None:
        if self.images.dim() != 5 or self.images.shape[0] != len(self.names):
            raise ValueError(
                f"images must be [n_characters, n_drawers, C, H, W] with one row per name; got "
                f"shape {tuple(self.images.shape)} for {len(self.names)} names."
            )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_drawers(self) -> int:
        """Drawers (examples) per character."""
        return int(self.images.shape[1])

    @property
    def alphabets(self) -> list[str]:
        """Sorted distinct alphabet names."""
        return sorted({name.split("/")[0] for name in self.names})


def _member_key(member: str) -> tuple[str, str] | None:
    """``(alphabet/character, drawer file)`` for a PNG path ``.../<Alphabet>/<character>/<file>``."""
    parts = [part for part in member.replace("\\", "/").split("/") if part]
    if len(parts) < 3 or not parts[-1].lower().endswith(".png") or "__MACOSX" in parts:
        return None
    return f"{parts[-3]}/{parts[-2]}", parts[-1]


def _source_fingerprint(source: pathlib.Path) -> dict:
    """Name, size and mtime of an archive, or file count/size/newest mtime of a folder."""
    if source.is_file():
        stat = source.stat()
        return {"name": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stats = [p.stat() for p in source.rglob("*.png")]
    return {
        "name": str(source.resolve()),
        "files": len(stats),
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def omniglot_cache_dir() -> pathlib.Path:
    """Cache folder: ``$XDG_CACHE_HOME/implicitdiff``, default ``~/.cache/implicitdiff``.

    Examples
    --------
    >>> omniglot_cache_dir().name
    'implicitdiff'
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "implicitdiff"


def _read_characters(sources: Sequence[pathlib.Path]) -> tuple[list[str], torch.Tensor]:
    """Decode every character once (first source wins on duplicate names)."""
    drawings: dict[str, list[torch.Tensor]] = {}
    for source in sources:
        seen_here: dict[str, list[tuple[str, object]]] = {}
        if source.is_file():
            archive = zipfile.ZipFile(source)
            for member in archive.namelist():
                key = _member_key(member)
                if key is not None:
                    seen_here.setdefault(key[0], []).append((key[1], member))
        else:
            archive = None
            for png in source.rglob("*.png"):
                key = _member_key(str(png.relative_to(source)))
                if key is not None:
                    seen_here.setdefault(key[0], []).append((key[1], png))
        try:
            for character, files in seen_here.items():
                if character in drawings:  # e.g. Greek/Latin in both small archives
                    continue
                images = []
                for _, handle in sorted(files, key=lambda item: item[0]):
                    if archive is not None:
                        label = f"{source}:{handle}"
                        images.append(load_image(archive.read(handle), name=label))
                    else:
                        images.append(load_image(handle))
                drawings[character] = images
        finally:
            if archive is not None:
                archive.close()
    names = sorted(drawings)
    counts = {name: len(drawings[name]) for name in names}
    n_drawers = min(counts.values())
    if n_drawers < 2:
        short = [name for name, count in counts.items() if count < 2]
        raise ValueError(
            f"Omniglot characters need at least 2 drawings each; {short[:5]} have fewer."
        )
    # Keep the same number of drawers for every character (a rectangular tensor).
    images = torch.stack([torch.stack(drawings[name][:n_drawers]) for name in names])
    return names, images


def load_omniglot(
    root: PathLike | None = None,
    *,
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> OmniglotCharacters:
    """Load and preprocess every Omniglot character found under ``root``.

    All archives/extracted folders under ``root`` are read; characters present
    in several of them are kept once (by ``"alphabet/character"`` name). If
    characters have different numbers of drawings, every character keeps the
    smallest count (at least 2 are required).

    Parameters
    ----------
    root
        See :func:`resolve_omniglot_root`; ``None`` uses the environment
        variable or the bundled default.
    cache
        Store/reuse the preprocessed tensor in ``cache_dir``, keyed by the
        source archive names, sizes and modification times.
    cache_dir
        Defaults to :func:`omniglot_cache_dir`.

    Returns
    -------
    OmniglotCharacters
        ``images`` ``[n_characters, n_drawers, 1, 28, 28]`` float32 and
        ``names``, sorted by name.

    Raises
    ------
    FileNotFoundError
        If no Omniglot data is found (the message explains where to get it).

    Examples
    --------
    >>> chars = load_omniglot()  # doctest: +SKIP
    >>> chars.images.shape  # bundled small background sets  # doctest: +SKIP
    torch.Size([242, 20, 1, 28, 28])
    """
    resolved = resolve_omniglot_root(root)
    if resolved is None:
        raise FileNotFoundError(
            _missing_data_message(
                f"No Omniglot path was given, ${OMNIGLOT_ENV_VAR} is unset and the default "
                f"location {str(default_omniglot_dir())!r}"
            )
        )
    sources = _find_sources(resolved)
    cache_file = None
    if cache:
        key = json.dumps(
            {"version": _CACHE_FORMAT_VERSION, "sources": [_source_fingerprint(s) for s in sources]},
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        folder = pathlib.Path(cache_dir) if cache_dir is not None else omniglot_cache_dir()
        cache_file = folder / f"omniglot-{digest}.pt"
        if cache_file.is_file():
            try:
                stored = load_checkpoint(cache_file, required=("images", "names"), what="Omniglot cache",
                                         weights_only=True)
                return OmniglotCharacters(images=stored["images"], names=list(stored["names"]))
            except (CheckpointError, TypeError, ValueError):  # a truncated/foreign file: rebuild it below
                pass
    names, images = _read_characters(sources)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temp file in the same folder, then rename: readers never see a partial file.
        handle, temp_name = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save({"images": images, "names": names}, stream)
            os.chmod(temp_name, 0o644)  # mkstemp makes it owner-only; a cache is shareable
            os.replace(temp_name, cache_file)
        except BaseException:
            if os.path.exists(temp_name):
                os.unlink(temp_name)
            raise
    return OmniglotCharacters(images=images, names=names)


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------
def split_characters(
    n_characters: int,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
) -> dict[str, torch.Tensor]:
    """Split character indices into disjoint ``"train"``, ``"val"``, ``"test"`` sets.

    The split sizes are ``round(fraction * n_characters)`` for train and val;
    test gets the rest. The permutation is fixed by ``seed``.

    Parameters
    ----------
    n_characters
        Number of characters to split.
    seed
        Seed of the random permutation.
    fractions
        Three non-negative numbers summing to 1 (train, val, test).

    Returns
    -------
    dict[str, torch.Tensor]
        Sorted int64 index tensors that together cover ``range(n_characters)``.

    Examples
    --------
    >>> splits = split_characters(242, seed=0)
    >>> [len(splits[k]) for k in ("train", "val", "test")]
    [169, 24, 49]
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers, got {tuple(fractions)}.")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {sum(fractions)}).")
    if n_characters < 1:
        raise ValueError(f"n_characters must be positive, got {n_characters}.")
    n_train = int(round(fractions[0] * n_characters))
    n_val = int(round(fractions[1] * n_characters))
    n_train = min(n_train, n_characters)
    n_val = min(n_val, n_characters - n_train)
    sizes = {"train": n_train, "val": n_val, "test": n_characters - n_train - n_val}
    for (split, size), fraction in zip(sizes.items(), fractions):
        if fraction > 0 and size == 0:
            raise ValueError(
                f"The {split!r} split of {n_characters} characters with fractions "
                f"{tuple(fractions)} would be empty."
            )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_characters, generator=generator)
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = order[start : start + size].sort().values
        start += size
    return out


# ----------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------
class Episode(NamedTuple):
    """A batch of few-shot tasks.

    Classification (``N`` ways, ``K`` shots, ``Q`` queries per class):
    ``x_support [B, N*K, C, H, W]``, ``y_support [B, N*K]`` (int64 in
    ``0..N-1``), ``x_query [B, N*Q, C, H, W]``, ``y_query [B, N*Q]``. Support
    and query examples are grouped by label (label ``i`` at positions
    ``i*K .. i*K+K-1``). Regression (sinusoid): ``x``/``y`` are ``[B, K, 1]``
    float.

    Examples
    --------
    >>> episode = SinusoidTasks(shots=5, queries=3).sample(2, torch.Generator().manual_seed(0))
    >>> episode.batch_size, tuple(episode.y_query.shape)
    (2, (2, 3, 1))
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    def to(self, device: torch.device | str) -> Episode:
        """Move every tensor to ``device``."""
        return Episode(*(t.to(device) for t in self))

    @property
    def batch_size(self) -> int:
        """Number of tasks in the batch."""
        return int(self.x_support.shape[0])


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class OmniglotTasks:
    """N-way K-shot classification tasks over Omniglot characters.

    A class is a (character, rotation) pair: rotating a character by 90, 180 or
    270 degrees makes a new class, as in the MAML and iMAML papers, so
    ``num_classes = 4 * n_characters`` with ``rotations=True``.

    Parameters
    ----------
    images
        ``[n_characters, n_drawers, C, H, W]`` (e.g. one split of
        :attr:`OmniglotCharacters.images`).
    ways, shots, queries
        Classes per task, support examples per class, query examples per class.
    rotations
        Use rotations as extra classes.

    Raises
    ------
    ValueError
        If ``ways`` exceeds the available classes or ``shots + queries``
        exceeds the drawers per character.

    Examples
    --------
    >>> images = torch.rand(10, 20, 1, 28, 28)
    >>> tasks = OmniglotTasks(images, ways=5, shots=1, queries=15)
    >>> episode = tasks.sample(4, torch.Generator().manual_seed(0))
    >>> episode.x_support.shape, episode.x_query.shape
    (torch.Size([4, 5, 1, 28, 28]), torch.Size([4, 75, 1, 28, 28]))
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        ways: int,
        shots: int,
        queries: int,
        rotations: bool = True,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 5:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [n_characters, n_drawers, C, H, W], got {shape}.")
        _check_positive(ways=ways, shots=shots, queries=queries)
        if rotations and images.shape[-1] != images.shape[-2]:
            raise ValueError(f"rotations need square images, got {tuple(images.shape[-2:])}.")
        self.images = images
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rotations = rotations
        self._n_rotations = 4 if rotations else 1
        if ways > self.num_classes:
            raise ValueError(
                f"ways={ways} exceeds the {self.num_classes} classes available "
                f"({images.shape[0]} characters x {self._n_rotations} rotations)."
            )
        if shots + queries > self.num_drawers:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries} exceeds the "
                f"{self.num_drawers} drawers per character."
            )

    @property
    def num_classes(self) -> int:
        """Distinct (character, rotation) classes."""
        return int(self.images.shape[0]) * self._n_rotations

    @property
    def num_drawers(self) -> int:
        """Examples per character."""
        return int(self.images.shape[1])

    def sample(self, batch_size: int, generator: torch.Generator) -> Episode:
        """Draw ``batch_size`` tasks: N distinct classes, K+Q distinct drawers per class.

        Labels are assigned to the drawn classes in random order.
        """
        _check_positive(batch_size=batch_size)
        n, k, q = self.ways, self.shots, self.queries
        # Random permutations via argsort of uniform noise: one per task (classes) / per class (drawers).
        classes = torch.rand(batch_size, self.num_classes, generator=generator).argsort(dim=1)[:, :n]
        drawers = torch.rand(batch_size, n, self.num_drawers, generator=generator).argsort(dim=2)[..., : k + q]
        device = self.images.device
        characters = (classes // self._n_rotations).to(device)
        turns = (classes % self._n_rotations).to(device)
        picked = self.images[characters.unsqueeze(-1), drawers.to(device)]  # [B, N, K+Q, C, H, W]
        if self.rotations:
            picked = picked.clone()
            for turn in (1, 2, 3):
                mask = turns == turn
                if mask.any():
                    picked[mask] = torch.rot90(picked[mask], turn, dims=(-2, -1))
        labels = torch.arange(n, device=device).view(1, n, 1)
        shape = picked.shape[3:]
        x_support = picked[:, :, :k].reshape(batch_size, n * k, *shape)
        x_query = picked[:, :, k:].reshape(batch_size, n * q, *shape)
        y_support = labels.expand(batch_size, n, k).reshape(batch_size, n * k)
        y_query = labels.expand(batch_size, n, q).reshape(batch_size, n * q)
        return Episode(x_support, y_support, x_query, y_query)


class SinusoidTasks:
    """Sinusoid regression tasks of the MAML paper: ``y = A sin(x - phase)``.

    ``A ~ U(amplitude)``, ``phase ~ U(phase)`` per task and ``x ~ U(x_range)``
    per point.

    Examples
    --------
    >>> tasks = SinusoidTasks(shots=10, queries=10)
    >>> tasks.sample(3, torch.Generator().manual_seed(0)).x_support.shape
    torch.Size([3, 10, 1])
    """

    def __init__(
        self,
        *,
        shots: int,
        queries: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        _check_positive(shots=shots, queries=queries)
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}.")
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    @staticmethod
    def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator)

    def sample(self, batch_size: int, generator: torch.Generator) -> Episode:
        """Draw ``batch_size`` sinusoids with ``shots`` support and ``queries`` query points."""
        _check_positive(batch_size=batch_size)
        amplitude = self._uniform((batch_size, 1, 1), self.amplitude, generator)
        phase = self._uniform((batch_size, 1, 1), self.phase, generator)
        x = self._uniform((batch_size, self.shots + self.queries, 1), self.x_range, generator)
        y = amplitude * torch.sin(x - phase)
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def fixed_episodes(
    tasks: OmniglotTasks | SinusoidTasks,
    n_episodes: int,
    seed: int,
    batch_size: int = 50,
) -> list[Episode]:
    """Deterministic evaluation episodes: ``n_episodes`` tasks in batches of ``batch_size``.

    The same ``(tasks, n_episodes, seed, batch_size)`` always gives the same
    episodes, so every method is evaluated on identical held-out tasks.

    Examples
    --------
    >>> batches = fixed_episodes(SinusoidTasks(shots=5, queries=5), 120, seed=0)
    >>> [b.batch_size for b in batches]
    [50, 50, 20]
    """
    _check_positive(n_episodes=n_episodes, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_episodes, batch_size):
        out.append(tasks.sample(min(batch_size, n_episodes - start), generator))
    return out


def build_omniglot_splits(
    root: PathLike | None = None,
    *,
    seed: int = 0,
    ways: int,
    shots: int,
    queries: int,
    rotations: bool = True,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    characters: OmniglotCharacters | None = None,
) -> dict[str, OmniglotTasks]:
    """Omniglot task samplers for disjoint ``"train"``/``"val"``/``"test"`` character splits.

    Characters never overlap between splits; rotations only add classes
    within a split.

    Parameters
    ----------
    root
        Data location (see :func:`resolve_omniglot_root`); ignored when
        ``characters`` is given.
    seed, fractions
        Passed to :func:`split_characters`.
    ways, shots, queries, rotations
        Passed to :class:`OmniglotTasks`.
    characters
        Already loaded characters (skips :func:`load_omniglot`).

    Examples
    --------
    >>> splits = build_omniglot_splits(ways=5, shots=1, queries=15)  # doctest: +SKIP
    >>> splits["train"].num_classes  # 169 characters x 4 rotations  # doctest: +SKIP
    676
    """
    data = characters if characters is not None else load_omniglot(root)
    indices = split_characters(len(data), seed=seed, fractions=fractions)
    return {
        split: OmniglotTasks(
            data.images[index], ways=ways, shots=shots, queries=queries, rotations=rotations
        )
        for split, index in indices.items()
    }
