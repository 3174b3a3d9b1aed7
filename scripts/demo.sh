#!/usr/bin/env bash
# Install everything (system packages when missing, .venv) and run a real local deployment on
# loopback: an rsync daemon, a deploy-agent, and deploy-client driving them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
