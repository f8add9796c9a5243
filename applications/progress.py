"""Progress bars of the applications' long phases: tqdm on stderr with a count, a rate and an ETA.

Every long loop of the command-line applications (meta-training, supervised pre-training,
held-out evaluation, hypergradient descent, ...) reports through :func:`progress_bar`;
``--no-progress`` turns them all off (``enabled=False`` returns a bar that prints nothing).

Examples
--------
>>> with progress_bar(3, "demo", unit="step", enabled=False) as bar:
...     for _ in range(3):
...         bar.update(1)
>>> bar.n
3
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar", "SilentBar"]


class SilentBar:
    """The no-output stand-in for a tqdm bar (``enabled=False``): counts, prints nothing."""

    def __init__(self, total: int | None = None, initial: int = 0) -> None:
        self.total = total
        self.n = initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> SilentBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar on stderr (``desc``, count / ``total``, rate, elapsed and remaining time), or a silent one.

    Parameters
    ----------
    total : int or None
        Number of units of work (None: unknown, no ETA).
    desc : str
        What is running, shown first on the bar (e.g. ``"evaluation"``).
    unit : str
        Name of one unit (``"episode"``, ``"epoch"``, ``"step"``), shown in the rate.
    enabled : bool
        False: a :class:`SilentBar` (what ``--no-progress`` gives).
    initial : int
        Units already done (a resumed run).
    """
    if not enabled:
        return SilentBar(total, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
