#!/usr/bin/env bash
# Host set-up for replay-migrate on Debian 12 (bookworm), run as root. Idempotent: every step checks
# before it acts, so a second run only verifies. Called by `make demo` and `make test`.
#
#   - bookworm-backports libvirt >= 11.2 and QEMU >= 9.0 (the sparse save format needs them)
#   - the tools the image build, tests and benchmarks use (mmdebstrap, Xvfb, b3sum, rsync, haproxy, ...)
#   - the libvirt-qemu user and kvm group, qemu.conf settings for a container without systemd
#   - virtlogd and libvirtd started if not running (libvirtd under a reaper where PID 1 is not an
#     init); waits until qemu:///system answers
#   - the venv at .venv with libvirt-python built from source against the installed headers
#   - the native leaf hashing library (differ/_leafhash.so) from blake3's C sources in Debian's
#     librust-blake3-dev; where it cannot be installed or built, leaves are hashed in Python
#     (~3x slower) and the reason is printed
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
LIBVIRT_MIN=11.2
QEMU_MIN=9.0
log() { printf 'setup-host: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root (libvirt's system daemon and mmdebstrap need it)"; exit 1; }
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || log "warning: written for Debian 12 (bookworm), this is ${PRETTY_NAME:-unknown}"

export DEBIAN_FRONTEND=noninteractive
BACKPORTS_PKGS=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev)
PLAIN_PKGS=(pkg-config gcc python3-dev python3-venv mmdebstrap e2fsprogs zstd b3sum rsync iproute2
            xvfb xdotool x11-utils python3-xlib python3-msgpack python3-pynput procps haproxy tini)

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null | sed 's/^[0-9]*://' || true; }

need_apt=0
for p in "${PLAIN_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need_apt=1; done
lv=$(installed_version libvirt-daemon); qv=$(installed_version qemu-system-x86)
if [ -z "$lv" ] || ! version_ge "$lv" "$LIBVIRT_MIN"; then need_apt=1; fi
if [ -z "$qv" ] || ! version_ge "$qv" "$QEMU_MIN"; then need_apt=1; fi
for p in "${BACKPORTS_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need_apt=1; done

if [ "$need_apt" = 1 ]; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports"
    # the main archive's URI from deb822 (URIs:) or one-line (deb URI suite) sources, not comments
    mirror=$( { grep -rhE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
                grep -rhE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } |
              grep -v security | head -n1 || true)
    echo "deb ${mirror:-http://deb.debian.org/debian} bookworm-backports main" > /etc/apt/sources.list.d/replay-migrate-backports.list
  fi
  log "apt-get update"
  apt-get update -qq
  log "installing ${PLAIN_PKGS[*]}"
  apt-get install -y -qq --no-install-recommends "${PLAIN_PKGS[@]}" >/dev/null
  log "installing from bookworm-backports: ${BACKPORTS_PKGS[*]}"
  apt-get install -y -qq -t bookworm-backports -o Dpkg::Options::=--force-confold "${BACKPORTS_PKGS[@]}" >/dev/null
fi
lv=$(installed_version libvirt-daemon); qv=$(installed_version qemu-system-x86)
version_ge "$lv" "$LIBVIRT_MIN" || { log "libvirt $lv < $LIBVIRT_MIN: the sparse save format is missing"; exit 1; }
version_ge "$qv" "$QEMU_MIN" || { log "QEMU $qv < $QEMU_MIN: the sparse save format is missing"; exit 1; }

# libvirt's QEMU driver wants these even when it runs guests as root
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
conf=/etc/libvirt/qemu.conf
set_conf() {  # key value: replace an active or commented-out line, or append
  if grep -qE "^\s*$1\s*=\s*$2\s*$" "$conf"; then return; fi
  if grep -qE "^\s*#?\s*$1\s*=" "$conf"; then sed -i -E "0,/^\s*#?\s*$1\s*=.*/s//$1 = $2/" "$conf"; else echo "$1 = $2" >> "$conf"; fi
  restart_libvirtd=1
}
restart_libvirtd=0
set_conf user '"root"'
set_conf group '"root"'
set_conf dynamic_ownership 0
set_conf security_driver '"none"'

mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/lib/libvirt/images
if [ "$restart_libvirtd" = 1 ] && pgrep -x libvirtd >/dev/null; then
  log "qemu.conf changed: restarting libvirtd"; pkill -x libvirtd || true
  for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
fi
pgrep -x virtlogd >/dev/null || { log "starting virtlogd"; virtlogd -d; }
# libvirtd daemonizes each QEMU, so a QEMU that exits is reaped by the nearest subreaper, else by
# PID 1, and libvirt's save and destroy return only once QEMU's pid is gone. Where PID 1 is not an
# init (this machine's left zombies ~1.8 s: bench/results/savepath.md) every save and destroy paid
# that; `tini -s` above libvirtd reaps them at once. Under systemd PID 1 reaps promptly.
pid1=$(cat /proc/1/comm 2>/dev/null || true)
reaper_wanted=0
case "$pid1" in systemd|init|tini|dumb-init|runit|s6-svscan) ;; *) reaper_wanted=1 ;; esac
lvpid=$(pgrep -xo libvirtd || true)
if [ -n "$lvpid" ] && [ "$reaper_wanted" = 1 ]; then
  lvparent=$(ps -o ppid= -p "$lvpid" | tr -d ' ')
  if [ "$(cat "/proc/$lvparent/comm" 2>/dev/null || true)" != tini ]; then
    log "libvirtd runs without a reaper (PID 1 is $pid1): restarting it under tini -s"
    pkill -x libvirtd || true
    for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
  fi
fi
if ! pgrep -x libvirtd >/dev/null; then
  if [ "$reaper_wanted" = 1 ]; then
    log "starting libvirtd under tini -s (PID 1 is $pid1)"
    setsid tini -s -- libvirtd </dev/null >>/var/log/libvirt/libvirtd-foreground.log 2>&1 &
  else
    log "starting libvirtd"; libvirtd -d
  fi
fi
for i in $(seq 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  [ "$i" = 100 ] && { log "libvirtd did not answer on qemu:///system within 20 s"; exit 1; }
  sleep 0.2
done

# the venv: Debian's python3, libvirt-python built from source against the installed libvirt headers
if [ ! -x "$VENV/bin/python" ]; then log "creating $VENV"; /usr/bin/python3 -m venv "$VENV"; fi
stamp="$VENV/.installed"
want=$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-16)-$lv
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the project into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --no-binary libvirt-python -e "$REPO[dev]"
  echo "$want" > "$stamp"
fi
# native leaf hashing (differ/leafhash.py): optional, so a failure here only falls back, with the reason
if ! dpkg -s librust-blake3-dev >/dev/null 2>&1; then
  log "installing librust-blake3-dev (blake3's C sources, for the native leaf hashing)"
  apt-get install -y -qq --no-install-recommends librust-blake3-dev >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends librust-blake3-dev >/dev/null 2>&1; } ||
    log "warning: librust-blake3-dev is not installable here: leaves will be hashed in Python (~3x slower)"
fi
(cd "$REPO" && PYTHONPATH="$REPO" "$VENV/bin/python" -m differ.leafhash --build) ||
  log "warning: the native leaf hashing could not be set up: leaves will be hashed in Python"
log "ready: libvirt $lv, QEMU $qv"
