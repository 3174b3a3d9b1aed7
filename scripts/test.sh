#!/usr/bin/env bash
# Install everything (system packages when missing, .venv) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check deploy tests twisted bench
.venv/bin/mypy deploy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
