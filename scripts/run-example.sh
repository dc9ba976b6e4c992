#!/usr/bin/env bash
# Quickstart: run the example session on the local metro (no UKC account needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
.venv/bin/ukc apply specs/hello.yaml
.venv/bin/ukc status specs/hello.yaml
