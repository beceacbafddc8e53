#!/usr/bin/env bash
# Build the settled Debian desktop guest (DESIGN.md §4) into OUT: base.qcow2 (ext4 on the whole
# disk, no partition table), vmlinuz, initrd.img (direct kernel boot), packages.txt.
#
#   build-image.sh OUT REPO
#
# Called by `replay-migrate image build` (store/images.py), which keys OUT by the hash of this
# recipe (this script, overlay/, the recorder agent's sources) and reuses it while that is unchanged.
# Settling (each measured to remove clone-to-clone disk differences): machine-id fixed after
# mmdebstrap, font caches built here, /tmp on tmpfs, volatile journal, utmp/wtmp services masked,
# /etc/adjtime on /run (setting a clone's clock, guest-set-time runs hwclock -w, which writes the
# time of day into it: 10-20 more divergent disk blocks per migration).
# What the state-making workloads use (replayer/workloads/{unpack,build,generate}.wl): gcc and make
# (+120 MiB in the base image), a compressed archive (Python's HTML documentation, 68 MiB in 1,133
# files as a 13 MiB tar.gz in /usr/local/share/rm-data; it is not unpacked anywhere in the image) and
# a small C project's sources (Lua 5.4, Debian's upstream tarball, in /usr/local/src/lua).
set -euo pipefail
OUT=${1:?usage: build-image.sh OUT REPO}
REPO=${2:?usage: build-image.sh OUT REPO}
HERE=$(cd "$(dirname "$0")" && pwd)
FREE_MB=${FREE_MB:-512}    # free space left in the guest's file system
PKGS=(
  systemd-sysv udev kmod procps
  linux-image-amd64 initramfs-tools zstd
  xserver-xorg-core xserver-xorg-input-libinput xinit x11-utils x11-xserver-utils xfonts-base fonts-dejavu-core fontconfig
  xterm python3 python3-tk python3-xlib python3-msgpack python3-pynput xdotool dex
  qemu-guest-agent
  gcc make libc6-dev
)
# the host's own Debian mirrors (the only network here), from deb822 or one-line sources
uris() { { grep -rhE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
           grep -rhE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } || true; }
MIRROR=${MIRROR:-$(uris | grep -v security | head -n1)}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(uris | grep security | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d "${OUT%/}.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs
mkdir -p "$ROOT" "$WORK/agent"
# the recorder agent and the shared root package, as the guest runs them (Debian's python3)
for pkg in recorder replay_migrate; do
  mkdir -p "$WORK/agent/$pkg"
  cp "$REPO/$pkg"/*.py "$WORK/agent/$pkg/"
done

mmdebstrap --mode=root --format=directory --variant=minbase --quiet \
  --include="$(IFS=,; echo "${PKGS[*]}")" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo MODULES=list > "$1/etc/initramfs-tools/conf.d/modules-list"' \
  --customize-hook="cp -a $HERE/overlay/. \"\$1\"/" \
  --customize-hook="mkdir -p \"\$1/usr/local/lib/replay-migrate\" && cp -a $WORK/agent/. \"\$1/usr/local/lib/replay-migrate/\"" \
  --customize-hook='chroot "$1" sh -ec "
      passwd -d root
      systemctl enable rm-desktop.service
      for t in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer; do systemctl disable \$t 2>/dev/null || true; done
      rm -rf /var/log/journal
      fc-cache -f
      cp /usr/share/systemd/tmp.mount /etc/systemd/system/ && systemctl enable tmp.mount
      ln -sf /run/adjtime /etc/adjtime
      systemctl mask systemd-update-utmp.service systemd-update-utmp-runlevel.service e2scrub_reap.service getty-static.service
      python3 -m compileall -q /usr/local/lib/replay-migrate
      mkdir -p /usr/local/share/rm-data /usr/local/src /tmp/rm-fetch && cd /tmp/rm-fetch
      apt-get download -q python3.11-doc >/dev/null
      mkdir x && dpkg-deb -x python3.11-doc_*.deb x
      tar -C x/usr/share/doc/python3.11 --owner=0 --group=0 --sort=name -czf /usr/local/share/rm-data/python-docs.tar.gz html
      apt-get source -q --download-only lua5.4 >/dev/null
      mkdir lua && tar -C lua --strip-components=1 -xzf lua5.4_*.orig.tar.gz && mv lua /usr/local/src/lua
      cd / && rm -rf /tmp/rm-fetch
      K=\$(ls /lib/modules)
      cd /lib/modules/\$K/kernel
      rm -rf sound drivers/media drivers/net/wireless drivers/infiniband drivers/staging drivers/isdn drivers/bluetooth net/bluetooth net/wireless net/mac80211 \
             drivers/gpu/drm/amd drivers/gpu/drm/radeon drivers/gpu/drm/nouveau drivers/gpu/drm/i915 drivers/scsi/lpfc drivers/scsi/qla2xxx drivers/net/ethernet
      depmod -a \$K
      update-initramfs -u -k \$K >/dev/null
  "' \
  bookworm "$ROOT" \
  "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY_MIRROR bookworm-security main" \
  "deb-src $MIRROR bookworm main"
# one fixed machine-id for every clone; after mmdebstrap, whose clean-up empties it (an empty id makes
# each boot generate a random one and run first-boot units)
systemd-machine-id-setup --root="$ROOT" >/dev/null
K=$(ls "$ROOT/lib/modules")
mkdir -p "$OUT"
cp "$ROOT/boot/vmlinuz-$K" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-$K" "$OUT/initrd.img"
chroot "$ROOT" dpkg-query -W -f='${Package} ${Version}\n' > "$OUT/packages.txt"
USED_MB=$(du -sm --apparent-size "$ROOT" | cut -f1)
SIZE_MB=$(( USED_MB * 115 / 100 + FREE_MB ))
mkfs.ext4 -q -F -L guestroot -I 256 -d "$ROOT" "$WORK/base.raw" "${SIZE_MB}M"
qemu-img convert -O qcow2 "$WORK/base.raw" "$OUT/base.qcow2"
echo "kernel=$K fs_MB=$SIZE_MB qcow2_bytes=$(stat -c %s "$OUT/base.qcow2")"
