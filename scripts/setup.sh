#!/usr/bin/env bash
# Idempotent setup on Debian: system packages the local metro needs, and a venv with ukc.
#   bubblewrap       sandbox isolation          openssh-server  sshd inside each sandbox
#   openssh-client   ssh for the workflow tests rsync           the baseline and workflow tests
#   openssl, curl    TLS clients of the tests   python3         the in-sandbox agent (/usr/bin/python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
need=()
for pair in bwrap:bubblewrap /usr/sbin/sshd:openssh-server ssh:openssh-client rsync:rsync \
            openssl:openssl curl:curl /usr/bin/python3:python3; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ] || need+=("$pkg")
done
PY=${PYTHON:-python3}
# Debian's own python3 ships venv/ensurepip in a separate package.
"$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.ukc-installed ] || [ pyproject.toml -nt .venv/.ukc-installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch .venv/.ukc-installed
fi
