#!/usr/bin/env bash
# bed.sh - ca-watchdog's real-Dogtag test bed: Dogtag PKI 10.10 (Debian 11 packages) master + clone
# CA, each with its own 389-DS 1.4.4, replicating both ways, in a debootstrapped bullseye chroot on
# a Debian 12 host. No systemd needed. Run as root. Everything listens on 127.0.0.1 only:
#
#   role    CA instance        https  http  shutdown  DS         LDAP
#   master  pki-tomcat         8443   8080  8005      ds-master  23389
#   clone   pki-tomcat-clone   9443   9080  9005      ds-clone   24389
#
# Passwords: Directory Manager, caadmin and every p12: Secret.123; replication: Repl.Secret.123.
# Host-side files (DOGTAG_ROOT, default /srv/cawd-dogtag):
#   $ROOT/root/lab/agent.pem   agent (caadmin) client cert + key, PEM (agent.crt / agent.key apart)
#   $ROOT/root/lab/ca.pem      the CA signing cert, PEM (verifies both CAs' TLS)
#   $ROOT/etc/pki/<inst>/ca/CS.cfg, $ROOT/run/pki-shim/<inst>.pid (the JVM's pid)
#
# Usage:
#   bed.sh build                      make (or finish, or reuse) the bed; leaves all four running
#   bed.sh start [master|clone|all]   start DS then CA, wait for getStatus running
#   bed.sh stop  [master|clone|all]   stop CA then DS (SIGTERM, SIGKILL after a timeout)
#   bed.sh status                     one line per process; exit 0 if all four are up
#   bed.sh ca-start INST [--guard-config CFG]
#                                     start only the CA; returns once the JVM is launched (like a
#                                     Type=simple unit). With --guard-config, `ca-watchdog guard
#                                     --config CFG INST` runs on the host first (the unit's
#                                     ExecStartPre= drop-in); the CA is not started if it fails.
#   bed.sh ca-stop INST               stop only the CA (SIGTERM, SIGKILL after CA_STOP_TIMEOUT=90 s)
#   bed.sh kill-ca INST               SIGKILL the JVM (a crash)
#   bed.sh kill-ds NAME | start-ds NAME | stop-ds NAME
#   bed.sh destroy                    stop everything, unmount, remove the tree
# INST: pki-tomcat | pki-tomcat-clone (or master | clone); NAME: ds-master | ds-clone (or master | clone).
#
# Environment: DOGTAG_ROOT, DOGTAG_MIRROR (default: the host's Debian mirror), CA_WATCHDOG (default
# <repo>/.venv/bin/ca-watchdog), CA_STOP_TIMEOUT, DS_STOP_TIMEOUT, WAIT_TIMEOUT (for getStatus).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${DOGTAG_ROOT:-/srv/cawd-dogtag}
ROOT=${ROOT%/}
CA_WATCHDOG=${CA_WATCHDOG:-$REPO/.venv/bin/ca-watchdog}
CA_STOP_TIMEOUT=${CA_STOP_TIMEOUT:-90}
DS_STOP_TIMEOUT=${DS_STOP_TIMEOUT:-60}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-300}
SUITE=bullseye
PW=Secret.123
LAB=/root/lab # inside the chroot
HLAB=$ROOT$LAB
LOCKFILE=$ROOT.lock
# 389-ds-base + pki-ca: the bed; ldap-utils, curl: probes; procps, iproute2: ps/ss, a private netns
# for dscreate; openssl: PEM export
PKGS=(389-ds-base pki-ca ldap-utils curl procps iproute2 openssl)

CAS=(pki-tomcat pki-tomcat-clone)
DSS=(ds-master ds-clone)
declare -A CA_HTTPS=([pki-tomcat]=8443 [pki-tomcat-clone]=9443)
declare -A CA_HTTP=([pki-tomcat]=8080 [pki-tomcat-clone]=9080)
declare -A DS_PORT=([ds-master]=23389 [ds-clone]=24389)
declare -A DS_SPORT=([ds-master]=23636 [ds-clone]=24636)
declare -A ROLE_CA=([master]=pki-tomcat [clone]=pki-tomcat-clone)
declare -A ROLE_DS=([master]=ds-master [clone]=ds-clone)
OUR_PORTS=(8443 8080 8005 9443 9080 9005 23389 24389 23636 24636)

# --- output ------------------------------------------------------------------------------------
T0=$(date +%s%N)
say() {
  local ms=$((($(date +%s%N) - T0) / 1000000))
  printf '%s [+%4d.%01ds] %s\n' "$(date +%T)" $((ms / 1000)) $((ms % 1000 / 100)) "$*"
}
die() {
  echo "bed.sh: $*" >&2
  exit 1
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# --- the chroot ----------------------------------------------------------------------------------
# a clean environment; /usr/local/sbin first so that the systemctl shim wins; fd 9 (the lock) is
# never passed on, so that no daemon started from here can hold it
ch() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 "$@" 9>&-; }

# Run "$@" holding the bed's lock (mounts, build, start): concurrent calls queue instead of racing.
# Nested calls run directly (the holder's subshell has BED_LOCKED set).
locked() {
  if [ -n "${BED_LOCKED:-}" ]; then
    "$@"
    return
  fi
  mkdir -p "$(dirname "$LOCKFILE")"
  (
    flock 9
    BED_LOCKED=1
    "$@"
  ) 9>"$LOCKFILE"
}

mounts_under_root() { awk -v r="$ROOT/" 'index($2, r) == 1 { print $2 }' /proc/self/mounts; }

do_mount() {
  local d
  [ -d "$ROOT/proc" ] || die "$ROOT is not a chroot (run: bash $0 build)"
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/sys" || mount -t sysfs sys "$ROOT/sys"
  if ! mountpoint -q "$ROOT/dev"; then
    mount --rbind /dev "$ROOT/dev" # brings /dev/pts and /dev/shm along
    # unmounting ours must never unmount the host's (no propagation back)
    mount --make-rslave "$ROOT/dev" 2>/dev/null || true
  fi
  for d in proc sys dev; do mountpoint -q "$ROOT/$d" || die "could not mount $ROOT/$d"; done
}
ensure_mounts() {
  mountpoint -q "$ROOT/proc" && mountpoint -q "$ROOT/sys" && mountpoint -q "$ROOT/dev" && return 0
  locked do_mount
}

# pids of processes whose root is the tree (none may be left when unmounting or removing it)
tree_pids() {
  local d p r
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    r=$(readlink "$d/root" 2>/dev/null) || continue
    [ "$r" = "$ROOT" ] && echo "$p"
  done
  return 0
}

do_umount() {
  local m
  if [ -n "$(tree_pids)" ]; then
    say "processes still run in $ROOT: $(tree_pids | tr '\n' ' ')- mounts kept"
    return 0
  fi
  for m in dev sys proc; do
    if mountpoint -q "$ROOT/$m"; then umount -R "$ROOT/$m" || umount -lR "$ROOT/$m"; fi
  done
  [ -z "$(mounts_under_root)" ] || die "still mounted under $ROOT: $(mounts_under_root | tr '\n' ' ')"
}

# --- processes -----------------------------------------------------------------------------------
cmdline_has() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$2"; }

ca_pid() { # prints the JVM's pid if this instance's Tomcat runs (or is being launched)
  local p
  p=$(cat "$ROOT/run/pki-shim/$1.pid" 2>/dev/null) || return 1
  [ -n "$p" ] || return 1
  if cmdline_has "$p" "-Dcatalina.base=/var/lib/pki/$1 " || launching "$p" "$1"; then echo "$p"; else return 1; fi
}
# The recorded pid is the JVM's only once catalina.sh has exec'd java: for the first second or so it
# is setpriv / tomcat-start.sh / catalina.sh, with the instance's CATALINA_BASE in its environment. A
# stop in that window used to say "not running", remove the pid file and leave a Tomcat that nothing
# knew about (it held the ports: every later start of that CA died, and its stop "succeeded" while it
# kept answering).
launching() { # pid inst
  tr '\0' '\n' 2>/dev/null <"/proc/$1/environ" | grep -qxF "CATALINA_BASE=/var/lib/pki/$2" &&
    ! tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "-Dcatalina.base="
}
ds_pid() {
  local p
  p=$(cat "$ROOT/run/dirsrv/slapd-$1.pid" 2>/dev/null) || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = ns-slapd ] && cmdline_has "$p" "/etc/dirsrv/slapd-$1" && echo "$p"
}

# SIGTERM, wait up to $3 s, then SIGKILL; prints what happened
stop_pid() { # label pid timeout
  local label=$1 p=$2 t i
  t=$(date +%s%N)
  kill -TERM "$p" 2>/dev/null || return 0
  for ((i = 0; i < $3 * 10; i++)); do
    if ! kill -0 "$p" 2>/dev/null; then
      say "$label stopped (pid $p) in $(ms_since "$t") ms"
      return 0
    fi
    sleep 0.1
  done
  kill -KILL "$p" 2>/dev/null || true
  while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
  say "$label: SIGKILL after $3 s (pid $p)"
}

ldap_up() { ch ldapsearch -x -o nettimeout=2 -H "ldap://127.0.0.1:$1" -s base -b "" vendorVersion >/dev/null 2>&1; }

ca_http_code() { # https port -> the HTTP status of getStatus (000: no answer)
  ch curl -sk -m 3 -o /dev/null -w '%{http_code}' "https://127.0.0.1:$1/ca/admin/ca/getStatus" 2>/dev/null || true
}

ca_state() { # https port -> the <Status> text of getStatus, or nothing
  ch curl -sk -m 3 "https://127.0.0.1:$1/ca/admin/ca/getStatus" 2>/dev/null |
    sed -n 's|.*<Status>\([a-z]*\)</Status>.*|\1|p' || true
}

wait_ldap() { # name; fails early once the pid file names a dead process (ns-slapd writes it late)
  local i p
  for ((i = 0; i < 600; i++)); do
    ldap_up "${DS_PORT[$1]}" && return 0
    if p=$(cat "$ROOT/run/dirsrv/slapd-$1.pid" 2>/dev/null) && [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null; then
      die "DS $1 exited (see $ROOT/var/log/dirsrv/slapd-$1/errors)"
    fi
    if [ "$i" -ge 150 ] && ! ds_pid "$1" >/dev/null; then
      die "DS $1 is not running (see $ROOT/var/log/dirsrv/slapd-$1/errors: $(tail -n 1 "$ROOT/var/log/dirsrv/slapd-$1/errors" 2>/dev/null))"
    fi
    sleep 0.1
  done
  die "DS $1: LDAP on 127.0.0.1:${DS_PORT[$1]} did not answer within 60 s"
}

wait_ca() { # inst t0(ns, 0: no start command): until getStatus says running; fails early when the JVM is gone
  local inst=$1 t0=$2 end
  end=$(($(date +%s) + WAIT_TIMEOUT))
  until [ "$(ca_state "${CA_HTTPS[$inst]}")" = running ]; do
    ca_pid "$inst" >/dev/null || die "CA $inst: the JVM exited (see $ROOT/var/log/pki/$inst/systemd-shim.log)"
    [ "$(date +%s)" -lt "$end" ] || die "CA $inst not running after ${WAIT_TIMEOUT} s"
    sleep 0.25
  done
  if [ "$t0" = 0 ]; then
    say "CA $inst running on https://127.0.0.1:${CA_HTTPS[$inst]}"
  else
    say "CA $inst running on https://127.0.0.1:${CA_HTTPS[$inst]} ($(ms_since "$t0") ms after its start command)"
  fi
}

# --- DS and CA control ---------------------------------------------------------------------------
lib389_no_systemd() {
  # lib389 calls `systemctl ... dirsrv@` unless with_systemd = 0 (a package file: re-applied each time)
  sed -i 's/^with_systemd = 1$/with_systemd = 0/' "$ROOT/usr/share/dirsrv/inf/defaults.inf"
}

ds_launch() { # name: start ns-slapd (it forks; what dsctl start runs) without waiting
  local n=$1
  ds_pid "$n" >/dev/null && return 0
  [ -f "$ROOT/etc/dirsrv/slapd-$n/dse.ldif" ] || die "DS $n does not exist (run: bash $0 build)"
  rm -f "$ROOT/run/dirsrv/slapd-$n.pid"
  # a killed ns-slapd leaves its lock (server/<pid>); with that pid reused by another process the
  # next start stops: "Unable to start slapd because it is already running as process <pid>"
  rm -f "$ROOT/run/lock/dirsrv/slapd-$n/server/"* "$ROOT/run/lock/dirsrv/slapd-$n/imports/"* \
    "$ROOT/run/lock/dirsrv/slapd-$n/exports/"*
  mkdir -p "$ROOT/run/dirsrv" "$ROOT/run/lock/dirsrv/slapd-$n"
  ch chown dirsrv:dirsrv /run/dirsrv /run/lock/dirsrv /run/lock/dirsrv/slapd-"$n"
  # (its console only repeats the errors log, e.g. "Can not access /proc/sys/crypto/fips_enabled")
  ch /usr/sbin/ns-slapd -D "/etc/dirsrv/slapd-$n" -i "/run/dirsrv/slapd-$n.pid" >/dev/null 2>&1
}
ds_start() { # name
  local n=$1 t
  if ds_pid "$n" >/dev/null; then
    wait_ldap "$n"
    return 0
  fi
  ensure_mounts
  t=$(date +%s%N)
  ds_launch "$n"
  wait_ldap "$n"
  say "DS $n answers on 127.0.0.1:${DS_PORT[$n]} in $(ms_since "$t") ms (pid $(ds_pid "$n"))"
}
ds_stop() {
  local p
  if p=$(ds_pid "$1"); then stop_pid "DS $1" "$p" "$DS_STOP_TIMEOUT"; fi
  rm -f "$ROOT/run/dirsrv/slapd-$1.pid"
}

ca_launch() { # inst [guard-config]: like `systemctl start` of the unit (+ the guard drop-in)
  local inst=$1 cfg=${2:-} rc
  if ca_pid "$inst" >/dev/null; then
    say "CA $inst already running (pid $(ca_pid "$inst"))"
    return 0
  fi
  [ -f "$ROOT/etc/pki/$inst/ca/CS.cfg" ] || die "CA $inst does not exist (run: bash $0 build)"
  ensure_mounts
  ch systemctl _exec-start-pre "pki-tomcatd@$inst.service" || die "CA $inst: ExecStartPre failed"
  if [ -n "$cfg" ]; then
    [ -x "$CA_WATCHDOG" ] || die "ca-watchdog not found at $CA_WATCHDOG (set CA_WATCHDOG)"
    rc=0
    "$CA_WATCHDOG" guard --config "$cfg" "$inst" 9>&- || rc=$?
    [ "$rc" = 0 ] || die "CA $inst: guard failed (exit $rc); not started"
  fi
  ch systemctl _exec-start "pki-tomcatd@$inst.service" || die "CA $inst: ExecStart failed"
  say "CA $inst launched (JVM pid $(cat "$ROOT/run/pki-shim/$inst.pid"))"
}
ca_stop() {
  local p
  if p=$(ca_pid "$1"); then stop_pid "CA $1" "$p" "$CA_STOP_TIMEOUT"; else say "CA $1 not running"; fi
  rm -f "$ROOT/run/pki-shim/$1.pid"
}

# --- build steps ---------------------------------------------------------------------------------
done_mark() { touch "$HLAB/.done-$1"; }
is_done() { [ -f "$HLAB/.done-$1" ]; }
undo_mark() { rm -f "$HLAB/.done-$1"; }

host_mirror() {
  local m
  m=${DOGTAG_MIRROR:-}
  [ -n "$m" ] || m=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $1; exit}')
  [ -n "$m" ] || m=$(awk '$1 == "deb" && $2 !~ /security/ && $2 ~ /debian/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  [ -n "$m" ] || m=http://deb.debian.org/debian
  echo "${m%/}"
}

step_host_tools() {
  command -v debootstrap >/dev/null && return 0
  say "installing debootstrap on the host"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}

wipe_tree() {
  [ -e "$ROOT" ] || return 0
  local p
  for p in $(tree_pids); do kill -KILL "$p" 2>/dev/null || true; done
  sleep 0.2
  do_umount
  rm -rf --one-file-system "$ROOT"
}

step_debootstrap() {
  if is_done debootstrap && [ -x "$ROOT/usr/bin/apt-get" ] && [ -x "$ROOT/bin/bash" ]; then return 0; fi
  local mirror log
  mirror=$(host_mirror)
  if [ -e "$ROOT" ]; then
    say "removing the half-made tree $ROOT"
    wipe_tree
  fi
  mkdir -p "$(dirname "$ROOT")"
  log=$(mktemp /tmp/cawd-debootstrap.XXXXXX.log)
  say "debootstrap --variant=minbase $SUITE $ROOT $mirror"
  if ! debootstrap --variant=minbase "$SUITE" "$ROOT" "$mirror" >"$log" 2>&1; then
    tail -20 "$log" >&2
    die "debootstrap failed (log $log)"
  fi
  mkdir -p "$HLAB"
  mv "$log" "$HLAB/debootstrap.log"
  done_mark debootstrap
}

step_chroot_config() { # cheap, redone every build
  local mirror
  mirror=$(host_mirror)
  mkdir -p "$HLAB"
  # bullseye-security is left out: the mirror lacks part of it (404 for 389-ds-base, tomcat9-user...)
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$SUITE" "$mirror" "$SUITE" >"$ROOT/etc/apt/sources.list"
  cat >"$ROOT/etc/apt/apt.conf.d/90cawd-bed" <<'EOF'
APT::Install-Recommends "false";
Acquire::Check-Valid-Until "false";
Acquire::Languages "none";
EOF
  echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/90cawd-unsafe-io" # no fsync per file: faster
  rm -f "$ROOT/etc/dpkg/dpkg.cfg.d/90cawd-nodoc" # (tried once; not measured from nothing)
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"         # packages start nothing
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  # no ::1 line: "localhost" can only mean 127.0.0.1
  printf '127.0.0.1 localhost\n127.0.0.1 %s\n' "$(hostname)" >"$ROOT/etc/hosts"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

step_packages() {
  if ch dpkg -s "${PKGS[@]}" >/dev/null 2>&1; then return 0; fi
  say "apt-get install ${PKGS[*]} in the chroot (about 320 packages)"
  ensure_mounts
  ch apt-get update -qq >"$HLAB/apt.log" 2>&1 || {
    tail -20 "$HLAB/apt.log" >&2
    die "apt-get update failed in the chroot"
  }
  ch env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PKGS[@]}" >>"$HLAB/apt.log" 2>&1 || {
    tail -30 "$HLAB/apt.log" >&2
    die "apt-get install failed in the chroot (log $HLAB/apt.log)"
  }
  ch apt-get clean
}

step_files() { # cheap, redone every build: the shim, lib389's switch, the pkispawn configs
  install -m 755 "$HERE/systemctl-shim" "$ROOT/usr/local/sbin/systemctl"
  lib389_no_systemd
  install -m 600 "$HERE/config/ca-master.cfg" "$HERE/config/ca-clone.cfg" "$HLAB/"
  mkdir -p "$ROOT/run/pki-shim"
}

ds_done() { is_done "ds-$1" && grep -q '^nsslapd-listenhost: 127.0.0.1' "$ROOT/etc/dirsrv/slapd-$1/dse.ldif" 2>/dev/null; }
ca_done() { is_done "ca-$1" && [ -f "$ROOT/etc/pki/$1/ca/CS.cfg" ]; }

teardown_ds() {
  local n=$1
  undo_mark "ds-$n"
  ds_stop "$n"
  [ -d "$ROOT/etc/dirsrv/slapd-$n" ] || return 0
  say "removing DS $n"
  ch dsctl "$n" remove --do-it >/dev/null 2>&1 || true
  rm -rf "$ROOT/etc/dirsrv/slapd-$n" "$ROOT/var/lib/dirsrv/slapd-$n" "$ROOT/var/log/dirsrv/slapd-$n" \
    "$ROOT/run/lock/dirsrv/slapd-$n" "$ROOT/run/dirsrv/slapd-$n".* "$ROOT/run/slapd-$n.socket"
}
teardown_ca() {
  local i=$1
  undo_mark "ca-$i"
  ca_stop "$i" >/dev/null
  [ -d "$ROOT/var/lib/pki/$i" ] || [ -d "$ROOT/etc/pki/$i" ] || return 0
  say "removing CA $i"
  ch pkidestroy -s CA -i "$i" >/dev/null 2>&1 || true
  rm -rf "$ROOT/var/lib/pki/$i" "$ROOT/etc/pki/$i" "$ROOT/var/log/pki/$i" "$ROOT/root/.dogtag/$i" \
    "$ROOT/etc/default/$i" "$ROOT/etc/sysconfig/$i"
}

make_ds() { # name: dscreate in a private network namespace, pin to 127.0.0.1, start
  local n=$1 t netns=()
  t=$(date +%s%N)
  cat >"$HLAB/$n.inf" <<EOF
[general]
full_machine_name = localhost
strict_host_checking = False
selinux = False
start = False

[slapd]
instance_name = $n
port = ${DS_PORT[$n]}
secure_port = ${DS_SPORT[$n]}
root_password = $PW
self_sign_cert = False
EOF
  # dscreate starts the new server listening on every interface while it configures it: give it a
  # network namespace of its own (loopback only) when the machine allows one
  if unshare -n true 2>/dev/null; then netns=(unshare -n); fi
  if ! "${netns[@]}" chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    /bin/sh -c "ip link set lo up 2>/dev/null; exec dscreate from-file $LAB/$n.inf" >"$HLAB/dscreate-$n.log" 2>&1 9>&-; then
    tail -20 "$HLAB/dscreate-$n.log" >&2
    return 1
  fi
  ds_stop "$n" # in case it was left running
  sed -i '/^dn: cn=config$/a nsslapd-listenhost: 127.0.0.1' "$ROOT/etc/dirsrv/slapd-$n/dse.ldif"
  ds_launch "$n"
  wait_ldap "$n"
  done_mark "ds-$n"
  say "DS $n made and running on 127.0.0.1:${DS_PORT[$n]} ($(ms_since "$t") ms)"
}

step_ds() { # both at once
  local n pids=() failed=0
  ensure_mounts
  for n in "${DSS[@]}"; do
    if ds_done "$n"; then continue; fi
    teardown_ds "$n"
    say "dscreate $n (LDAP 127.0.0.1:${DS_PORT[$n]})"
    make_ds "$n" &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || failed=1; done
  [ "$failed" = 0 ] || die "dscreate failed"
  for n in "${DSS[@]}"; do ds_start "$n"; done
}

# address="127.0.0.1" on the Unsecure and Secure connectors of server.xml (Tomcat binds every
# interface by default; pkispawn has no setting for it). Returns 1 if it had to change the file.
pin_loopback() { # inst
  local x=/etc/pki/$1/server.xml out
  out=$(ch python3 - "$x" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
def pin(m):
    tag = m.group(0)
    if re.search(r'\bname="(Unsecure|Secure)"', tag) and "address=" not in tag:
        return tag.replace("<Connector", '<Connector address="127.0.0.1"', 1)
    return tag
# real (uncommented) connectors only: drop comments when looking, keep them when writing
parts = re.split(r"(<!--.*?-->)", text, flags=re.S)
new = "".join(p if p.startswith("<!--") else re.sub(r"<Connector\b[^>]*>", pin, p) for p in parts)
live = "".join(p for p in re.split(r"(<!--.*?-->)", new, flags=re.S) if not p.startswith("<!--"))
pinned = [t for t in re.findall(r"<Connector\b[^>]*>", live) if re.search(r'\bname="(Unsecure|Secure)"', t)]
if len(pinned) != 2 or not all('address="127.0.0.1"' in t for t in pinned):
    sys.exit("could not pin the Unsecure and Secure connectors")
if new != text:
    with open(path, "r+") as f:  # in place: keeps owner and mode
        f.write(new)
        f.truncate()
    print("changed")
PY
  ) || die "$x: could not pin the connectors to 127.0.0.1"
  [ "$out" != changed ]
}

spawn_ca() { # inst cfg: pkispawn in two steps (install, pin the connectors to 127.0.0.1, configure)
  local i=$1 cfg=$2 t
  t=$(date +%s%N)
  say "pkispawn $i step 1 (--skip-configuration)"
  ch pkispawn -s CA -f "$cfg" --skip-configuration >"$HLAB/pkispawn-$i-1.log" 2>&1 || {
    tail -20 "$HLAB/pkispawn-$i-1.log" >&2
    die "pkispawn $i step 1 failed"
  }
  pin_loopback "$i" || true
  # both steps archive their config as spawn_deployment.cfg.<YYYYmmddHHMMSS>: in the same second
  # step 2 fails at its very end with "File ... already exists!"
  while [ -e "$ROOT/var/log/pki/$i/ca/archive/spawn_deployment.cfg.$(date +%Y%m%d%H%M%S)" ]; do sleep 0.2; done
  say "pkispawn $i step 2 (--skip-installation)"
  ch pkispawn -s CA -f "$cfg" --skip-installation >"$HLAB/pkispawn-$i-2.log" 2>&1 || {
    grep -v '^log4j' "$HLAB/pkispawn-$i-2.log" | tail -20 >&2
    die "pkispawn $i step 2 failed"
  }
  say "pkispawn $i done ($(ms_since "$t") ms)"
}

step_ca_master() {
  if ca_done pki-tomcat; then return 0; fi
  spawn_ca pki-tomcat "$LAB/ca-master.cfg"
  done_mark ca-pki-tomcat
}

step_export() { # agent cert/key and CA cert as PEM, for clients on the host
  local p12=/root/.dogtag/pki-tomcat/ca_admin_cert.p12
  if [ ! -s "$HLAB/agent.pem" ] || [ "$HLAB/agent.pem" -ot "$ROOT$p12" ]; then
    (
      umask 077
      ch openssl pkcs12 -in "$p12" -passin "pass:$PW" -nodes -clcerts -nokeys -out "$LAB/agent.crt"
      ch openssl pkcs12 -in "$p12" -passin "pass:$PW" -nodes -nocerts -out "$LAB/agent.key"
      cat "$HLAB/agent.crt" "$HLAB/agent.key" >"$HLAB/agent.pem"
    )
  fi
  # (alias/ca.crt is no good: a chain that starts with the sslserver cert)
  ch certutil -L -d /etc/pki/pki-tomcat/alias -n "caSigningCert cert-pki-tomcat CA" -a >"$HLAB/ca.pem.tmp"
  grep -q 'BEGIN CERTIFICATE' "$HLAB/ca.pem.tmp" || die "could not export the CA signing cert"
  chmod 644 "$HLAB/ca.pem.tmp"
  mv "$HLAB/ca.pem.tmp" "$HLAB/ca.pem"
}

step_ca_clone() {
  if ca_done pki-tomcat-clone; then return 0; fi
  # a failed attempt may have left an agreement toward the clone on the master's DS
  ch ldapdelete -x -H "ldap://127.0.0.1:${DS_PORT[ds-master]}" -D 'cn=Directory Manager' -w "$PW" \
    'cn=masterAgreement1-localhost-pki-tomcat-clone,cn=replica,cn=o\3Dpki-tomcat-CA,cn=mapping tree,cn=config' \
    >/dev/null 2>&1 || true
  # the clone's p12 (subsystem, CA/OCSP/audit signing certs + keys) and the CA cert
  mkdir -p "$HLAB/clone-files"
  rm -f "$HLAB/clone-files/ca-certs.p12"
  ch pki-server ca-clone-prepare -i pki-tomcat --pkcs12-file "$LAB/clone-files/ca-certs.p12" \
    --pkcs12-password "$PW" >"$HLAB/clone-prepare.log" 2>&1 || {
    tail -20 "$HLAB/clone-prepare.log" >&2
    die "pki-server ca-clone-prepare failed"
  }
  cp "$ROOT/etc/pki/pki-tomcat/alias/ca.crt" "$HLAB/clone-files/ca_signing.crt"
  spawn_ca pki-tomcat-clone "$LAB/ca-clone.cfg"
  done_mark ca-pki-tomcat-clone
}

check_loopback_only() {
  local bad
  bad=$(ch ss -Hltn 2>/dev/null | awk -v ports=" ${OUR_PORTS[*]} " '{
    n = split($4, a, ":"); port = a[n]; addr = substr($4, 1, length($4) - length(port) - 1)
    if (index(ports, " " port " ") && addr != "127.0.0.1" && addr != "[::ffff:127.0.0.1]") print $4 }')
  [ -z "$bad" ] || die "listening beyond 127.0.0.1: $bad"
}

build() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local t i
  t=$(date +%s%N)
  say "build: $ROOT"
  step_host_tools
  step_debootstrap
  step_chroot_config
  ensure_mounts
  step_packages
  # shellcheck disable=SC2016 # ${Version} is dpkg-query's
  say "pki-ca $(ch dpkg-query -W -f='${Version}' pki-ca), 389-ds-base $(ch dpkg-query -W -f='${Version}' 389-ds-base)," \
    "tomcat9 $(ch dpkg-query -W -f='${Version}' tomcat9-user)"
  step_files
  # a step that has to be (re)done invalidates the ones that build on it
  if ! ds_done ds-master || ! ca_done pki-tomcat; then
    teardown_ca pki-tomcat-clone
    teardown_ca pki-tomcat
    teardown_ds ds-clone
    teardown_ds ds-master
  elif ! ds_done ds-clone || ! ca_done pki-tomcat-clone; then
    teardown_ca pki-tomcat-clone
    teardown_ds ds-clone
  fi
  step_ds
  step_ca_master
  step_ca_clone
  step_export
  for i in "${CAS[@]}"; do
    if ! pin_loopback "$i"; then
      say "CA $i: connectors pinned to 127.0.0.1 in server.xml"
      ca_stop "$i"
    fi
  done
  start_role all
  check_loopback_only
  say "build done in $(ms_since "$t") ms"
  echo "agent cert+key (PEM): $HLAB/agent.pem  (cert $HLAB/agent.crt, key $HLAB/agent.key)"
  echo "CA signing cert (PEM): $HLAB/ca.pem"
}

# --- role-level start/stop/status ----------------------------------------------------------------
roles_of() {
  case ${1:-all} in
    all) echo master clone ;;
    master | clone) echo "$1" ;;
    *) die "expected master, clone or all, not '$1'" ;;
  esac
}

start_role() {
  local r n i t pids=() failed=0
  declare -A started=()
  ensure_mounts
  lib389_no_systemd
  for r in $(roles_of "${1:-all}"); do ds_start "${ROLE_DS[$r]}" & pids+=($!); done
  for n in "${pids[@]}"; do wait "$n" || failed=1; done
  [ "$failed" = 0 ] || die "a DS did not start"
  for r in $(roles_of "${1:-all}"); do
    i=${ROLE_CA[$r]}
    [ -f "$ROOT/etc/pki/$i/ca/CS.cfg" ] || continue
    if ca_pid "$i" >/dev/null; then
      # a CA started while its DS was down answers 404 for good (the JVM stays up): restart it
      if [ "$(ca_state "${CA_HTTPS[$i]}")" != running ] && [ "$(ca_http_code "${CA_HTTPS[$i]}")" = 404 ]; then
        say "CA $i answers 404 (started while its DS was down?): restarting it"
        ca_stop "$i"
      else
        started[$i]=0 # already running: only checked
        continue
      fi
    fi
    t=$(date +%s%N)
    ca_launch "$i"
    started[$i]=$t
  done
  pids=()
  for i in "${!started[@]}"; do wait_ca "$i" "${started[$i]}" & pids+=($!); done
  for n in "${pids[@]}"; do wait "$n" || failed=1; done
  [ "$failed" = 0 ] || die "a CA did not come up"
}

stop_role() { # the CAs (at once), then their DS (at once); with "all" also unmounts
  local r
  for r in $(roles_of "${1:-all}"); do ca_stop "${ROLE_CA[$r]}" & done
  wait
  for r in $(roles_of "${1:-all}"); do ds_stop "${ROLE_DS[$r]}" & done
  wait
  [ "${1:-all}" = all ] && locked do_umount
  return 0
}

status() {
  local n i p ok=0 state
  for n in "${DSS[@]}"; do
    if p=$(ds_pid "$n"); then
      if ldap_up "${DS_PORT[$n]}"; then state=up; else state="running, LDAP not answering" ok=1; fi
      echo "ds $n pid $p ldap 127.0.0.1:${DS_PORT[$n]} $state"
    else
      echo "ds $n down"
      ok=1
    fi
  done
  for i in "${CAS[@]}"; do
    if p=$(ca_pid "$i"); then
      state=$(ca_state "${CA_HTTPS[$i]}")
      [ "$state" = running ] || ok=1
      echo "ca $i pid $p https 127.0.0.1:${CA_HTTPS[$i]} http 127.0.0.1:${CA_HTTP[$i]} getStatus ${state:-(no answer)}"
    else
      echo "ca $i down"
      ok=1
    fi
  done
  return $ok
}

destroy() {
  [ -e "$ROOT" ] || {
    say "nothing at $ROOT"
    return 0
  }
  local p
  stop_role all
  for p in $(tree_pids); do kill -KILL "$p" 2>/dev/null || true; done
  sleep 0.2
  do_umount
  [ -z "$(tree_pids)" ] || die "processes still run in $ROOT"
  say "removing $ROOT"
  rm -rf --one-file-system "$ROOT"
  rm -f "$LOCKFILE"
}

# --- argument helpers ----------------------------------------------------------------------------
ca_name() {
  case ${1:-} in
    master | clone) echo "${ROLE_CA[$1]}" ;;
    pki-tomcat | pki-tomcat-clone) echo "$1" ;;
    *) die "unknown CA instance '${1:-}' (pki-tomcat, pki-tomcat-clone)" ;;
  esac
}
ds_name() {
  case ${1:-} in
    master | clone) echo "${ROLE_DS[$1]}" ;;
    ds-master | ds-clone) echo "$1" ;;
    *) die "unknown DS '${1:-}' (ds-master, ds-clone)" ;;
  esac
}
need_tree() { [ -f "$HLAB/.done-debootstrap" ] || die "no bed at $ROOT (run: bash $0 build)"; }

main() {
  local cmd=${1:-}
  shift || true
  [ "$(id -u)" = 0 ] || die "run as root"
  case $cmd in
    build) locked build ;;
    start)
      need_tree
      locked start_role "${1:-all}"
      ;;
    stop)
      need_tree
      stop_role "${1:-all}"
      ;;
    status)
      need_tree
      status
      ;;
    ca-start)
      need_tree
      local inst cfg=""
      inst=$(ca_name "${1:-}")
      shift
      while [ $# -gt 0 ]; do
        case $1 in
          --guard-config)
            [ $# -ge 2 ] || die "--guard-config needs a file"
            cfg=$2
            shift 2
            ;;
          *) die "ca-start: unexpected argument '$1'" ;;
        esac
      done
      ca_launch "$inst" "$cfg"
      ;;
    ca-stop)
      need_tree
      ca_stop "$(ca_name "${1:-}")"
      ;;
    kill-ca)
      need_tree
      local inst p
      inst=$(ca_name "${1:-}")
      if p=$(ca_pid "$inst"); then
        kill -KILL "$p"
        while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
        say "CA $inst killed (SIGKILL, pid $p)"
      else
        say "CA $inst not running"
      fi
      ;;
    kill-ds)
      need_tree
      local n p
      n=$(ds_name "${1:-}")
      if p=$(ds_pid "$n"); then
        kill -KILL "$p"
        while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
        say "DS $n killed (SIGKILL, pid $p)"
      else
        say "DS $n not running"
      fi
      ;;
    start-ds)
      need_tree
      lib389_no_systemd
      ds_start "$(ds_name "${1:-}")"
      ;;
    stop-ds)
      need_tree
      ds_stop "$(ds_name "${1:-}")"
      ;;
    destroy) locked destroy ;;
    -h | --help | help | "") sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (try: $0 help)" ;;
  esac
}

main "$@"
