#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU (CI never runs this): the CUDA-parametrized
# tests, the benchmarks on the GPU, and the recipe (5-way and 20-way 1-shot) against the supervised
# baseline. Results land in ${OUT:-gpu_results}/. Usage: bash scripts/gpu_check.sh [META_ITERATIONS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
iterations=${1:-400}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
$py -m pip install -q -e ".[dev]" >/dev/null 2>&1 || true
$py -m pytest -q -k "device or cuda" tests 2>&1 | tee "$out/cuda_tests.log"
$py benchmarks/ridge_hypergradient.py --device cuda --out "$out" 2>&1 | tee "$out/ridge.log"
$py benchmarks/imaml_memory.py --device cuda --meta-batch 32 --out "$out" 2>&1 | tee "$out/memory.log"
for setting in 5way-1shot 20way-1shot; do
    $py -m applications.meta_learning compare --preset "recipe-$setting" --iterations "$iterations" \
        --methods imaml,baseline --device cuda --no-progress --output "$out/recipe_$setting" 2>&1 \
        | tail -20 | tee "$out/recipe_$setting.log"
done
