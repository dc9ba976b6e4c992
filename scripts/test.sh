#!/usr/bin/env bash
# The whole check, as CI runs it: lint, format, types, then the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
.venv/bin/ruff check reconciler tests bench
.venv/bin/ruff format --check reconciler tests bench
.venv/bin/mypy reconciler
# Each test run gets its own local-metro state dir (the fixtures set UKC_LOCAL_STATE_DIR).
exec .venv/bin/pytest -q -rfE -p no:cacheprovider "$@"
