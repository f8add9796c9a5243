#!/usr/bin/env bash
# Build the sdist and the wheel, check them, and install the wheel alone into a fresh virtual
# environment (CPU torch first) where it must import without the repository: no applications/,
# no scipy / scikit-learn / matplotlib. Needs .venv (scripts/setup.sh). Usage: bash scripts/check_package.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dist=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$dist" "$work"' EXIT

# a stale implicitdiff.egg-info/SOURCES.txt (from an older layout) would leak files into the sdist
rm -rf build implicitdiff.egg-info
.venv/bin/python -m build --outdir "$dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
rm -rf build
.venv/bin/python -m twine check --strict "$dist"/*
ls -l "$dist"

# the wheel holds the library and nothing else; the sdist holds no tests or applications
.venv/bin/python - "$dist" <<'EOF'
import pathlib, sys, tarfile, zipfile
dist = pathlib.Path(sys.argv[1])
(wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
extra = {t for t in tops if t != "implicitdiff" and not t.endswith(".dist-info")}
assert not extra, f"the wheel ships more than the library: {sorted(extra)}"
assert "implicitdiff/py.typed" in zipfile.ZipFile(wheel).namelist(), "py.typed missing from the wheel"
inside = {name.split("/")[1] for name in tarfile.open(sdist).getnames() if name.count("/") >= 1}
leaked = inside & {"applications", "tests", "benchmarks", "docs", "scripts"}
assert not leaked, f"the sdist ships {sorted(leaked)}"
print(f"{wheel.name}: {sorted(tops)}; {sdist.name}: {sorted(inside)}")
EOF

# a user's environment: CPU torch first (an unpinned torch would pull a multi-GB CUDA build), then the wheel
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$work/venv/bin/python" -m pip install -q "$dist"/*.whl
"$work/venv/bin/python" -m pip check
cd "$work"  # away from the checkout: only the installed package is importable
"$work/venv/bin/python" - <<'EOF'
import importlib.metadata, sys, warnings
sys.modules["applications"] = None  # the library must not reach for the repository's applications
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import implicitdiff as idiff
assert not caught, [str(w.message) for w in caught]  # e.g. torch's "Failed to initialize NumPy"
assert "site-packages" in idiff.__file__, idiff.__file__
assert importlib.metadata.version("implicitdiff") == idiff.__version__
heavy = sorted(m for m in ("scipy", "sklearn", "matplotlib") if m in sys.modules)
assert not heavy, f"import implicitdiff imported {heavy}"
a = torch.tensor([1.0, 2.0], requires_grad=True)
@idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum() + (x ** 2).sum())
def argmin(x, a):
    return a / 2
argmin(torch.zeros(2), a).sum().backward()
assert torch.allclose(a.grad, torch.full((2,), 0.5)), a.grad
print(f"implicitdiff {idiff.__version__} from the wheel works with torch {torch.__version__} "
      f"(python {sys.version.split()[0]}); no applications, scipy, scikit-learn or matplotlib needed")
EOF
