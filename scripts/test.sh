#!/usr/bin/env bash
# Set up the environment, check formatting and lint, and run the test suite (what CI runs).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff format --check --quiet kdcache tests bench examples
.venv/bin/ruff check --quiet kdcache tests bench examples
exec .venv/bin/python -m pytest -n 2 -q "$@"
