#!/usr/bin/env bash
# Create .venv (if missing) and install implicitdiff (editable) with its dev (tests, apps, ruff, mypy,
# build, twine) and docs extras; reinstalled when pyproject.toml or the version changes.
# torch is pinned to the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.implicitdiff-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ implicitdiff/_version.py -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" || .venv/bin/python -m pip install -q "torch>=2.13"
    .venv/bin/python -m pip install -q -e ".[dev,docs]"
    touch "$stamp"
fi
