"""The README's claims stay true: its quick-start block and its example run as written."""

from __future__ import annotations

import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_block_has_the_two_commands():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert block == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    ci = (pathlib.Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert block[1] in ci


def test_readme_example_runs_and_converges(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["log"][-1].converged
    assert namespace["log_lam"].grad.abs().sum() > 0
