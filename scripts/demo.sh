#!/usr/bin/env bash
# Install what is needed on a fresh Debian 12 machine (as root) and run the live failover demo:
# three simulated Dogtag CAs on real replicated 389-DS, three daemons; the master is killed
# (`ca-watchdog demo`: `lab up`, `lab kill ca1 ca`, `lab down` with a commentary; see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ca-watchdog demo "$@"
