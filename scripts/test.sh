#!/usr/bin/env bash
# Install everything, build the real beds, and run the whole test suite: unit, integration against
# real 389-DS and etcd started by the tests, end-to-end scenarios on simulated CAs, and the tests on
# real servers (tests/real): a real Dogtag 10.10 master + clone (beds/dogtag) and a real systemd
# booted with systemd-nspawn (beds/systemd). Run as root on Debian 12. A bed reused from an earlier
# run on the same machine is checked and finished, not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# a bed that cannot be built stops here, loudly: its tests would fail anyway
bash beds/dogtag/bed.sh build
bash beds/systemd/bed.sh build
# here every program is installed and every bed built: a test that would skip fails instead
export CAWD_NO_SKIPS=1
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
