#!/usr/bin/env bash
# Install everything and run the whole test suite (unit, integration against real 389-DS and
# etcd started by the tests, end-to-end scenarios). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
