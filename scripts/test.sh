#!/usr/bin/env bash
# Install (if needed) and run the whole test suite with the deterministic CI hypothesis profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} .venv/bin/python -m pytest "$@"
