#!/usr/bin/env bash
# Install what ca-watchdog's demo and tests need on a fresh Debian 12 machine (run as root).
# Idempotent: packages already present are not reinstalled; the venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(
  libsystemd-dev pkg-config gcc python3-dev python3-venv   # systemd-python builds against libsystemd
  libldap-dev libsasl2-dev                                 # python-ldap (needed by dogtag-pki's client)
  389-ds-base python3-lib389 ldap-utils                    # the real 389-DS lab
  etcd-server etcd-client                                  # the real etcd
  prometheus                                               # promtool, and the real Prometheus of the scrape test
  haproxy                                                  # examples/haproxy.cfg checked by the real HAProxy
  systemd                                                  # systemd-analyze verify
  iproute2 procps curl ca-certificates
)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps package scripts from starting etcd/prometheus/dirsrv services
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# lib389 calls systemctl unless told otherwise; there is no systemd as PID 1 here (see tests/lab)
if [ -f /usr/share/dirsrv/inf/defaults.inf ]; then
  sed -i 's/^with_systemd = 1$/with_systemd = 0/' /usr/share/dirsrv/inf/defaults.inf
fi
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
echo "setup done: $(.venv/bin/ca-watchdog --version)"
