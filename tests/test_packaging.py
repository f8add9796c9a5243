"""The package people depend on: one version, a declared torch range that import enforces, a light import.

Building and installing the wheel itself is CI's ``scripts/check_package.sh``.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import implicitdiff
from implicitdiff import _functorch, _version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text()
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()


def _run(code: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, away from the checkout (``applications`` not importable)."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_version_has_one_source():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "implicitdiff._version.__version__"
    assert implicitdiff.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", implicitdiff.__version__)
    # the installed metadata (scripts/setup.sh reinstalls when _version.py changes)
    assert importlib.metadata.version("implicitdiff") == implicitdiff.__version__


def test_changelog_has_the_version():
    version = implicitdiff.__version__
    if ".dev" in version:
        assert "## [Unreleased]" in CHANGELOG
    else:
        assert f"## [{version}]" in CHANGELOG
    assert "## [0.1.0]" in CHANGELOG and CHANGELOG.index("## [Unreleased]") < CHANGELOG.index("## [0.1.0]")


def test_supported_torch_is_declared_once_and_installed():
    torch_deps = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert torch_deps == [f"torch{_functorch.SUPPORTED_TORCH}"]
    floor = _functorch.SUPPORTED_TORCH.removeprefix(">=")
    installed = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    assert installed >= tuple(int(p) for p in floor.split(".")[:2]), (torch.__version__, floor)
    assert f"torch {_functorch.SUPPORTED_TORCH}" in README or f"torch{_functorch.SUPPORTED_TORCH}" in README
    python = PYPROJECT["project"]["requires-python"]
    assert f"Python {python}" in README


def test_import_needs_neither_the_applications_nor_heavy_dependencies(tmp_path):
    out = _run(
        "import sys\n"
        "sys.modules['applications'] = None  # any import of it fails\n"
        "import implicitdiff\n"
        "print(sorted(m for m in ('scipy', 'sklearn', 'matplotlib', 'pandas', 'PIL', 'applications') "
        "if sys.modules.get(m) is not None))\n",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "remove",
    [
        "sys.modules['torch._functorch.pyfunctorch'] = None",
        "import torch._C._functorch as f; del f.is_functorch_wrapped_tensor",
        "import torch.autograd.forward_ad as f; del f._current_level",
    ],
    ids=["interpreter-stack", "wrapped-tensor-probe", "forward-ad-level"],
)
def test_a_torch_without_the_private_api_fails_at_import_naming_versions(tmp_path, remove):
    out = _run(
        f"import sys, torch\n{remove}\n"
        "try:\n"
        "    import implicitdiff\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err)\n"
        "else:\n"
        "    print('imported')\n",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    message = out.stdout
    assert message.startswith("ImportError:"), message
    assert f"found torch {torch.__version__}" in message and f"torch{_functorch.SUPPORTED_TORCH}" in message


def test_readme_install_section_follows_quick_start():
    sections = re.findall(r"^## (.+)$", README, re.M)
    assert sections[:2] == ["Quick start", "Install"]
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    for needed in ("pip install .", "pip install implicitdiff", "download.pytorch.org/whl/cpu", "sphinx"):
        assert needed in install, needed


def test_ci_runs_lint_types_and_the_package_check():
    ci = (ROOT / ".ci" / "run").read_text()
    for step in ("bash scripts/test.sh", "ruff check", "mypy", "scripts/check_package.sh"):
        assert step in ci, step
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    for tool in ("ruff", "mypy", "build", "twine"):
        assert any(re.match(rf"{tool}\b", d) for d in dev), tool
