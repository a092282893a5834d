#!/bin/bash
# bed.sh: ca-watchdog's shipped systemd units under a REAL systemd (Debian 12's systemd 252 as PID 1
# of a systemd-nspawn container), for tests/real/test_systemd_bed.py and for trying things by hand.
#
#   bash beds/systemd/bed.sh up           # build (first time only) + boot + install this checkout
#   bash beds/systemd/bed.sh exec systemctl status ca-watchdog
#   bash beds/systemd/bed.sh poweroff
#
# Verbs (as root, on a Debian 12 host):
#   build      apt-get install systemd-container debootstrap (if missing), then debootstrap a
#              bookworm minbase tree with systemd, dbus, python3-venv, gcc, libsystemd-dev ... from the
#              host's configured Debian mirror. Idempotent: an intact tree (marker file, same package
#              list) is reused; a half-built one is removed and built again.
#   boot       boot the tree in the background; returns once `systemctl is-system-running` inside says
#              running (or degraded: the failed units are printed).
#   install    copy this checkout into the bed, (re)install it into the venv /opt/cawd there, put the
#              shipped units in /etc/systemd/system verbatim, a stand-in pki-tomcatd@.service of
#              Dogtag's shape running the lab's simulated CA as User=pkiuser, the config, the
#              credential, lab TLS material and a master CS.cfg (inbed-install.sh does the work).
#   reset      back to the state install leaves (units stopped, no store, master CS.cfg, fresh
#              credential), without reinstalling the package
#   up         build + boot + install
#   exec CMD   run CMD inside the booted bed (all namespaces, clean environment)
#   pid        print the host PID of the bed's PID 1 (exit 1 when the bed is not running)
#   status     say whether the tree is built and the bed running
#   poweroff   shut the bed down (systemctl poweroff inside; SIGTERM to nspawn after 60 s)
#   destroy    poweroff, then remove the tree
#
# Environment: SDBED_ROOT (tree, default /srv/cawd-sdbed), SDBED_MACHINE (cawd-sdbed),
# SDBED_STATE (pid file and console log, default /run/cawd-sdbed), SDBED_MIRROR (default: the
# host's own Debian mirror), SDBED_SRC (checkout to install, default the one holding this script),
# SDBED_CA_PORT / SDBED_PEER_PORT / SDBED_API_PORT (30443 / 30444 / 30099).
#
# This host's PID 1 need not be systemd (there is no machined, no system D-Bus): nspawn runs with
# --register=no --keep-unit (without --keep-unit it asks the host's systemd for a scope and dies with
# "Failed to open system bus"), and the bed is driven with nsenter, not machinectl/systemd-run -M.
# The bed shares the host's network namespace: everything in it listens on 127.0.0.1 only.
# A reboot inside the bed ends nspawn (nothing restarts it): use poweroff + boot.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${SDBED_ROOT:-/srv/cawd-sdbed}
MACHINE=${SDBED_MACHINE:-cawd-sdbed}
STATE=${SDBED_STATE:-/run/cawd-sdbed}
SRC=${SDBED_SRC:-$(cd "$HERE/../.." && pwd)}
CA_PORT=${SDBED_CA_PORT:-30443}
PEER_PORT=${SDBED_PEER_PORT:-30444}
API_PORT=${SDBED_API_PORT:-30099}
SUITE=bookworm
PKGS=systemd,systemd-sysv,dbus,python3,python3-venv,python3-dev,libsystemd-dev,pkg-config,gcc,procps,iproute2,ca-certificates,openssl,util-linux
MARKER=$ROOT/.cawd-sdbed-built  # written last by build: holds the package list of the tree
INBED_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "bed.sh: $*" >&2; exit 1; }
log() { echo "bed.sh: $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root"
lock() {  # for the verbs that change the bed: one bed.sh at a time (fd 9, closed for all they start),
  # and no silent exit: a command failing under set -e says which one
  set -o errtrace
  trap 'echo "bed.sh: ${verb:-?}: \"$BASH_COMMAND\" failed (exit $?, line $LINENO)" >&2' ERR
  mkdir -p "$STATE"
  exec 9>"$STATE/bed.lock"
  flock -w 600 9 || die "another bed.sh holds $STATE/bed.lock for more than 10 minutes"
}

host_mirror() {  # the machine's configured Debian mirror (deb822 or one-line sources), else deb.debian.org
  local m=""
  m=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $1; exit}') || true
  [ -n "$m" ] || m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1) || true
  echo "${m:-http://deb.debian.org/debian}"
}

tree_intact() { [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$SUITE $PKGS" ] && [ -x "$ROOT/lib/systemd/systemd" ]; }

# ---- running bed -------------------------------------------------------------------------------------

leader() {  # host PID of the bed's PID 1: the child of the systemd-nspawn we started
  local np c
  np=$(cat "$STATE/nspawn.pid" 2>/dev/null) || return 1
  kill -0 "$np" 2>/dev/null || return 1
  [ "$(ps -p "$np" -o comm= 2>/dev/null)" = systemd-nspawn ] || return 1
  c=$(ps --ppid "$np" -o pid= | head -n 1 | tr -d ' ')
  [ -n "$c" ] || return 1
  echo "$c"
}

bexec() {  # run a command inside the bed; env -i: the host's PIP_*, proxies, locale stay out
  local c
  c=$(leader) || die "bed $MACHINE is not running (start it: bash $HERE/bed.sh up)"
  nsenter -t "$c" -a env -i PATH="$INBED_PATH" HOME=/root TERM=dumb LANG=C.UTF-8 \
    SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@" 9>&-
}

# ---- verbs -------------------------------------------------------------------------------------------

build() {
  local t0=$SECONDS
  if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing systemd-container debootstrap on the host"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd-container debootstrap >/dev/null
  fi
  if tree_intact; then
    log "tree $ROOT is intact: reused"
  else
    if leader >/dev/null; then die "bed $MACHINE is running on a tree that is not intact: poweroff first"; fi
    [ -e "$ROOT" ] && { log "removing the incomplete tree $ROOT"; rm -rf --one-file-system "$ROOT"; }
    local mirror=${SDBED_MIRROR:-$(host_mirror)}
    log "debootstrap $SUITE into $ROOT from $mirror (a few minutes)"
    rm -rf --one-file-system "$ROOT.tmp"
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$ROOT.tmp" "$mirror" >"$ROOT.debootstrap.log" 2>&1 \
      || { tail -n 30 "$ROOT.debootstrap.log" >&2; die "debootstrap failed (log: $ROOT.debootstrap.log)"; }
    echo "$MACHINE" >"$ROOT.tmp/etc/hostname"
    : >"$ROOT.tmp/etc/machine-id"          # generated at first boot
    rm -f "$ROOT.tmp/var/cache/apt/archives/"*.deb
    echo "$SUITE $PKGS" >"$ROOT.tmp/.cawd-sdbed-built"
    mv "$ROOT.tmp" "$ROOT"
    log "tree built in $((SECONDS - t0)) s ($(du -sh --one-file-system "$ROOT" | cut -f1))"
  fi
}

boot() {
  if leader >/dev/null; then log "bed $MACHINE already running (PID 1 = host pid $(leader))"; return; fi
  tree_intact || die "no intact tree at $ROOT: run bash $HERE/bed.sh build"
  mkdir -p "$STATE"
  local t0=$SECONDS np
  # --console=read-only: the boot messages go to console.log, no tty needed.
  # setsid execs nspawn, so $! is nspawn itself (what leader() expects).
  ( cd /
    setsid systemd-nspawn -D "$ROOT" -b --machine="$MACHINE" --register=no --keep-unit \
      --console=read-only >"$STATE/console.log" 2>&1 </dev/null 9>&- &
    echo $! >"$STATE/nspawn.pid" )
  np=$(cat "$STATE/nspawn.pid")
  local state=""
  for _ in $(seq 1 240); do
    kill -0 "$np" 2>/dev/null || { tail -n 30 "$STATE/console.log" >&2; die "systemd-nspawn exited during boot (console: $STATE/console.log)"; }
    # nspawn may not have forked the bed's PID 1 yet (bexec would die): ask only once it has
    state=""
    if leader >/dev/null; then state=$(bexec systemctl is-system-running 2>/dev/null) || true; fi
    case "$state" in running|degraded) break ;; esac
    sleep 0.25
  done
  case "$state" in
    running) ;;
    degraded) log "system degraded; failed units:"; bexec systemctl --failed --no-legend >&2 || true ;;
    *) tail -n 30 "$STATE/console.log" >&2; die "bed did not boot within 60 s (state '${state}'; console: $STATE/console.log)" ;;
  esac
  log "bed $MACHINE: $state after $((SECONDS - t0)) s (nspawn pid $np, PID 1 = host pid $(leader))"
}

install_ca_watchdog() {
  local t0=$SECONDS
  leader >/dev/null || die "bed $MACHINE is not running: run bash $HERE/bed.sh boot"
  [ -f "$SRC/systemd/ca-watchdog.service" ] && [ -f "$SRC/pyproject.toml" ] || die "$SRC is not a ca-watchdog checkout"
  # a copy of the working tree (uncommitted changes included), without caches and build output
  rm -rf --one-file-system "$ROOT/root/cawd-src"
  mkdir -p "$ROOT/root/cawd-src"
  tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=./.lab --exclude=./build --exclude=./dist --exclude=.pytest_cache --exclude=.mypy_cache \
    --exclude=.ruff_cache --exclude=.hypothesis -cf - . | tar -C "$ROOT/root/cawd-src" -xf -
  # behind a TLS-intercepting proxy pip in the bed needs the host's CA bundle (the same one elsewhere)
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/root/host-ca-bundle.crt"
  inbed all
  log "installed in $((SECONDS - t0)) s"
}

inbed() {  # inbed-install.sh all|host inside the bed, with the ports
  [ -f "$ROOT/root/cawd-src/beds/systemd/inbed-install.sh" ] || die "nothing installed in the bed yet: run bash $HERE/bed.sh install"
  bexec env SDBED_CA_PORT="$CA_PORT" SDBED_PEER_PORT="$PEER_PORT" SDBED_API_PORT="$API_PORT" \
    /bin/bash /root/cawd-src/beds/systemd/inbed-install.sh "$1"
}

poweroff_bed() {
  local np
  np=$(cat "$STATE/nspawn.pid" 2>/dev/null) || { log "bed $MACHINE is not running"; return 0; }
  if ! kill -0 "$np" 2>/dev/null || [ "$(ps -p "$np" -o comm= 2>/dev/null)" != systemd-nspawn ]; then
    log "bed $MACHINE is not running"; rm -f "$STATE/nspawn.pid"; return 0
  fi
  bexec systemctl poweroff >/dev/null 2>&1 || true
  for _ in $(seq 1 240); do kill -0 "$np" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$np" 2>/dev/null; then
    log "still running after 60 s: SIGTERM to our systemd-nspawn $np"
    kill -TERM "$np"
    for _ in $(seq 1 40); do kill -0 "$np" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$STATE/nspawn.pid"
  log "bed $MACHINE powered off"
}

status() {
  if tree_intact; then echo "tree: $ROOT (intact)"; else echo "tree: $ROOT (not built)"; fi
  if leader >/dev/null; then echo "bed: running, PID 1 = host pid $(leader), system $(bexec systemctl is-system-running || true)"
  else echo "bed: not running"; fi
}

verb=${1:-}; shift || true
case "$verb" in build|boot|install|reset|up|poweroff|destroy) lock ;; esac
case "$verb" in
  build) build ;;
  boot) boot ;;
  install) install_ca_watchdog ;;
  reset) inbed host ;;
  up) build; boot; install_ca_watchdog ;;
  exec) [ $# -gt 0 ] || die "usage: bed.sh exec CMD..."; bexec "$@" ;;
  pid) leader ;;
  status) status ;;
  poweroff) poweroff_bed ;;
  destroy) poweroff_bed; rm -rf --one-file-system "$ROOT" "$ROOT.tmp" "$ROOT.debootstrap.log"; log "tree $ROOT removed" ;;
  *) die "usage: bed.sh build | boot | install | reset | up | exec CMD... | pid | status | poweroff | destroy" ;;
esac
