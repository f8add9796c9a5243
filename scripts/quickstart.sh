#!/usr/bin/env bash
# Install (if needed) and run the main job: a short iMAML run on the bundled Omniglot data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m applications.meta_learning train --preset quick "$@"
