#!/bin/bash
# Runs INSIDE the booted bed, as root (bed.sh install copies the checkout to /root/cawd-src and runs
# this). Installs ca-watchdog into the venv /opt/cawd and sets up one CA host, ca1, in a known state:
#   - both units stopped, the store (/var/lib/ca-watchdog) removed, CS.cfg master, no backups;
#   - /etc/ca-watchdog/config.toml: node ca1, SQLite store, service_control = "systemd", members
#     ca1 (this host, https://127.0.0.1:$SDBED_CA_PORT) and ca2 (https://127.0.0.1:$SDBED_PEER_PORT,
#     never started: the "other member" the guard can point at), API 127.0.0.1:$SDBED_API_PORT,
#     every [timing] key at its default;
#   - the credential /etc/ca-watchdog/credentials/ldap-password (0600);
#   - the shipped units, verbatim, in /etc/systemd/system, and the stand-in pki-tomcatd@.service.
# Idempotent: running it again resets the host to that state; `inbed-install.sh host` does only
# that, without touching the package (bed.sh reset; the tests do it before each check).
set -euo pipefail
SRC=/root/cawd-src
VENV=/opt/cawd
INST=pki-tomcat
CA_PORT=${SDBED_CA_PORT:-30443}
PEER_PORT=${SDBED_PEER_PORT:-30444}
API_PORT=${SDBED_API_PORT:-30099}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# behind a TLS-intercepting proxy (this workplace) pip needs the host's bundle; PIP_CERT reaches
# pip's build subprocesses too, --cert does not
[ -f /root/host-ca-bundle.crt ] && export PIP_CERT=/root/host-ca-bundle.crt

MODE=${1:-all}  # all: the package and the host; host: only the host (reset to the known state)
case "$MODE" in all|host) ;; *) echo "usage: inbed-install.sh [all|host]" >&2; exit 2 ;; esac

# ---- the package ------------------------------------------------------------------------------------
if [ "$MODE" = all ]; then
if [ ! -x $VENV/bin/pip ]; then
  python3 -m venv $VENV
  $VENV/bin/pip install -q 'setuptools>=77' wheel
fi
# dependencies (a no-op when present), then the checkout itself, always: the version number does
# not change with the code. No build isolation: setuptools is in the venv, nothing is downloaded.
$VENV/bin/pip install -q --no-build-isolation "$SRC[lab]"
$VENV/bin/pip install -q --no-build-isolation --no-deps --force-reinstall "$SRC"
# the shipped units run /usr/bin/ca-watchdog (the distribution package's path): put it there
ln -sfn $VENV/bin/ca-watchdog /usr/bin/ca-watchdog
fi
[ -x /usr/bin/ca-watchdog ] || { echo "ca-watchdog is not installed in the bed: run inbed-install.sh all" >&2; exit 1; }

# ---- known state: nothing running, no store, no test leftovers ----------------------------------
systemctl stop ca-watchdog.service "pki-tomcatd@$INST.service" "ca-watchdog-guard@$INST.service" 2>/dev/null || true
systemctl reset-failed ca-watchdog.service "pki-tomcatd@$INST.service" "ca-watchdog-guard@$INST.service" 2>/dev/null || true
rm -rf /run/systemd/system/ca-watchdog.service.d /run/systemd/system/pki-tomcatd@.service.d \
  "/run/systemd/system/pki-tomcatd@$INST.service.d" /run/systemd/system/ca-watchdog-guard@.service.d \
  "/run/systemd/system/ca-watchdog-guard@$INST.service.d"
rm -rf /var/lib/ca-watchdog

# ---- the CA host --------------------------------------------------------------------------------
getent passwd pkiuser >/dev/null || useradd --system --user-group --home-dir /var/lib/pki --shell /usr/sbin/nologin pkiuser
install -d -m 0770 -o pkiuser -g pkiuser /etc/pki/$INST /etc/pki/$INST/ca
install -d -m 0755 /etc/ca-watchdog
install -d -m 0700 /etc/ca-watchdog/lab /etc/ca-watchdog/credentials
rm -f /etc/pki/$INST/ca/CS.cfg.*.ca-watchdog
$VENV/bin/python3 - "$INST" <<'PY'
import sys
from importlib import resources
from pathlib import Path

from ca_watchdog import cscfg
from ca_watchdog.lab.pki import write_lab_pki

inst = sys.argv[1]
if not Path("/etc/ca-watchdog/lab/ca.pem").exists():
    write_lab_pki("/etc/ca-watchdog/lab")  # ca, server (127.0.0.1) and agent client certificates
# a master CS.cfg from the lab's template, this host being ca1
values = {"machineName": "ca1", "securitydomain.host": "ca1", "internaldb.ldapconn.host": "127.0.0.1"}
text = resources.files("ca_watchdog.lab").joinpath("CS.cfg.template").read_text()
lines = []
for line in text.splitlines(keepends=True):
    key = line.split("=", 1)[0]
    lines.append(f"{key}={values[key]}\n" if key in values else line)
cfg = cscfg.parse("".join(lines), "template")
assert cscfg.classify(cfg).role is cscfg.Role.MASTER, "the lab template is not a master CS.cfg"
Path(f"/etc/pki/{inst}/ca/CS.cfg").write_bytes(cfg.render())
PY
chown pkiuser:pkiuser /etc/pki/$INST/ca/CS.cfg
chmod 0660 /etc/pki/$INST/ca/CS.cfg
# the CA's own TLS material, pkiuser's (Tomcat's keystore stands in here)
install -m 0644 -o pkiuser -g pkiuser /etc/ca-watchdog/lab/server.pem /etc/pki/$INST/server.pem
install -m 0600 -o pkiuser -g pkiuser /etc/ca-watchdog/lab/server.key /etc/pki/$INST/server.key
install -m 0644 -o pkiuser -g pkiuser /etc/ca-watchdog/lab/ca.pem /etc/pki/$INST/ca.pem

# the LDAP bind password, as the README says (root, 0600); a new value each install
install -m 0600 /dev/stdin /etc/ca-watchdog/credentials/ldap-password <<<"sdbed-secret-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"

cat >/etc/ca-watchdog/config.toml <<TOML
# real-systemd bed (beds/systemd): one host (ca1), SQLite store, the lab's simulated CA as
# pki-tomcatd@$INST.service; ca2 is a member with nothing behind it. [timing]: the defaults.
[node]
name = "ca1"
cs_cfg = "/etc/pki/$INST/ca/CS.cfg"
service = "pki-tomcatd@$INST.service"
service_control = "systemd"
ldap_password_file = "ldap-password"

[[cluster.members]]
name = "ca1"
agent_url = "https://127.0.0.1:$CA_PORT"
priority = 100

[[cluster.members]]
name = "ca2"
agent_url = "https://127.0.0.1:$PEER_PORT"
priority = 50

[store]
backend = "sqlite"
path = "/var/lib/ca-watchdog/state.db"

[tls]
ca_file = "/etc/ca-watchdog/lab/ca.pem"
cert_file = "/etc/ca-watchdog/lab/agent.pem"
key_file = "/etc/ca-watchdog/lab/agent.key"

[api]
listen_host = "127.0.0.1"
listen_port = $API_PORT
TOML

# ---- units: the shipped ones verbatim, the stand-in CA unit ------------------------------------------
install -m 0644 $SRC/systemd/ca-watchdog.service /etc/systemd/system/ca-watchdog.service
install -m 0644 "$SRC/systemd/ca-watchdog-guard@.service" "/etc/systemd/system/ca-watchdog-guard@.service"
install -d -m 0755 /etc/systemd/system/pki-tomcatd@.service.d
install -m 0644 $SRC/systemd/pki-tomcatd@.service.d/ca-watchdog.conf /etc/systemd/system/pki-tomcatd@.service.d/ca-watchdog.conf
sed "s/@CA_PORT@/$CA_PORT/g" $SRC/beds/systemd/pki-tomcatd@.service >/etc/systemd/system/pki-tomcatd@.service
chmod 0644 /etc/systemd/system/pki-tomcatd@.service
systemctl daemon-reload
systemctl reset-failed 2>/dev/null || true

# a bare credential name is looked up in $CREDENTIALS_DIRECTORY, as under the unit
CREDENTIALS_DIRECTORY=/etc/ca-watchdog/credentials ca-watchdog check-config /etc/ca-watchdog/config.toml
echo "installed: $(ca-watchdog --version) from $SRC; CS.cfg $(ca-watchdog cscfg show /etc/pki/$INST/ca/CS.cfg | head -n 1)"
