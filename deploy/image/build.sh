#!/bin/bash
# Build a bootable raw x86-64 disk image that runs spamsink, from Debian packages only.
#
#   deploy/image/build.sh [--config FILE] [--token TOKEN] [--out FILE] [--size SIZE]
#                         [--qcow2] [--cache DIR] [--cmdline KERNEL_ARGS]
#
# The image boots on its own like a cloud instance (GRUB in the MBR, Debian's cloud
# kernel, DHCP on every Ethernet interface with systemd-networkd) straight into
# `spamsink serve` on port 25 with `netdrop` in front, both from deploy/systemd/.
# The SQLite store and TLS key live on the disk in /var/lib/spamsink. Options come
# from one config file (default deploy/spamsink.env), baked in as
# /etc/spamsink/spamsink.env; an empty API token is generated and printed once.
#
# Run as root on Debian (apt-get installs the build tools it misses). Needs the
# Debian mirror and PyPI (for the wheels of spamsink's dependencies). The configured
# base system is cached in --cache (default /var/cache/spamsink-image) keyed by the
# package list and base.sh, so later builds only add spamsink: delete the cache to
# pick up Debian updates.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
config=$repo/deploy/spamsink.env
token=
out=$here/build/spamsink.img
size=2G
qcow2=
cmdline=quiet
cache=${SPAMSINK_IMAGE_CACHE:-/var/cache/spamsink-image}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3

# What the image runs on; everything else comes in as dependencies.
packages=(systemd systemd-sysv udev dbus kmod iproute2 linux-image-cloud-amd64
          initramfs-tools zstd python3 python3-venv iptables libnetfilter-queue1)
# What this script runs on the build machine.
host_tools=(debootstrap e2fsprogs fdisk grub-pc-bin)

die() { echo "build.sh: $*" >&2; exit 1; }
usage() {
    sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case $1 in
        --config) [ $# -ge 2 ] || usage; config=$2; shift 2 ;;
        --token) [ $# -ge 2 ] || usage; token=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
        --size) [ $# -ge 2 ] || usage; size=$2; shift 2 ;;
        --qcow2) qcow2=1; shift ;;
        --cache) [ $# -ge 2 ] || usage; cache=$2; shift 2 ;;
        --cmdline) [ $# -ge 2 ] || usage; cmdline=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "build.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it): sudo make image"
[ -r "$config" ] || die "cannot read config file $config"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
[ -n "$qcow2" ] && host_tools+=(qemu-utils)

step_start=$SECONDS
step() { echo "== $* (at ${SECONDS}s)"; }

missing=()
for pkg in "${host_tools[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing build tools: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$cache" "$(dirname "$out")"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/spamsink-image.XXXXXX")
root=$work/root
mounted=()
cleanup() {
    local m
    for ((i=${#mounted[@]}-1; i>=0; i--)); do
        m=${mounted[i]}
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

chroot_mounts() {
    mount -t proc proc "$root/proc" && mounted+=("$root/proc")
    mount -t sysfs sys "$root/sys" && mounted+=("$root/sys")
    mount --bind /dev "$root/dev" && mounted+=("$root/dev")
    mount -t tmpfs tmpfs "$root/tmp" && mounted+=("$root/tmp")
}
# Commands in the image run with a clean environment, not the build machine's.
in_chroot() {
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"
}
chroot_unmounts() {
    local m
    for ((i=${#mounted[@]}-1; i>=0; i--)); do
        m=${mounted[i]}
        umount "$m"
    done
    mounted=()
}

# 1. The wheels: spamsink from this checkout plus its dependencies, built here.
step "building wheels"
if ! "$python" -m pip wheel -q --wheel-dir "$work/wheels" "$repo[netdrop]" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
    die "pip wheel failed (needs PyPI, and libnetfilter-queue-dev for NetfilterQueue)"
fi

# 2. The base system, from the cache when the package list and base.sh are unchanged.
key=$(printf '%s\n' "$suite" "$mirror" "${packages[@]}" | cat - "$here/base.sh" | sha256sum | cut -c1-16)
base=$cache/base-$suite-$key.tar
mkdir -p "$root"
if [ -f "$base" ]; then
    step "unpacking cached base system $base"
    tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xf "$base"
else
    step "debootstrap $suite (debs cached in $cache/debs)"
    mkdir -p "$cache/debs"
    debootstrap --variant=minbase --cache-dir="$cache/debs" \
        --include="$(IFS=,; echo "${packages[*]}")" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    step "configuring the base system (base.sh)"
    chroot_mounts
    cp "$here/base.sh" "$root/tmp/base.sh"
    in_chroot /bin/sh /tmp/base.sh
    chroot_unmounts
    step "caching the base system"
    tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -cf "$base.new" .
    mv "$base.new" "$base"
fi

# 3. spamsink itself, with the same scripts a Vagrant box or any Debian host uses.
step "installing spamsink and its units"
chroot_mounts
mkdir -p "$root/tmp/deploy"
cp -r "$repo/deploy/rig" "$repo/deploy/systemd" "$root/tmp/deploy/"
cp "$config" "$root/tmp/deploy/spamsink.env"
cp -r "$work/wheels" "$root/tmp/wheels"
in_chroot /bin/sh /tmp/deploy/rig/install.sh --wheels /tmp/wheels
in_chroot /bin/sh /tmp/deploy/rig/setup-sink.sh --config /tmp/deploy/spamsink.env \
    ${token:+--token "$token"}
chroot_unmounts
rm -rf "$root/var/cache/apt/"*.bin "$root/var/lib/apt/lists/"* "$root/root/.cache"

# 4. Filesystem and disk: ext4 made straight from the tree (no loop device, no mount),
#    one MBR partition at 1 MiB, GRUB's boot.img in the MBR and core.img behind it.
step "making the disk image"
uuid=$(cat /proc/sys/kernel/random/uuid)
echo "UUID=$uuid / ext4 defaults,errors=remount-ro 0 1" > "$root/etc/fstab"
offset=$((1024 * 1024))
rm -f "$out" "$work/root.ext4"
truncate -s "$size" "$out"
total=$(stat -c %s "$out")
mkfs.ext4 -q -F -L spamsink -U "$uuid" -O ^metadata_csum_seed,^orphan_file \
    -E root_owner=0:0 -d "$root" "$work/root.ext4" "$(( (total - offset) / 1024 ))k" \
    || die "mkfs.ext4 -d failed (e2fsprogs 1.47 or newer needed)"
echo "start=2048, type=83, bootable" | sfdisk -q "$out"
dd if="$work/root.ext4" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none

# The whole boot configuration lives inside core.img: /vmlinuz and /initrd.img are
# the links Debian's kernel package keeps current. Console on screen and serial
# (what clouds show as the instance's console log).
cat > "$work/grub-early.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root $uuid
linux /vmlinuz root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 $cmdline
initrd /initrd.img
boot
EOF
grub-mkimage -O i386-pc -o "$work/core.img" -c "$work/grub-early.cfg" -p /boot/grub \
    biosdisk part_msdos ext2 search search_fs_uuid linux boot serial terminal
core_sectors=$(( ($(stat -c %s "$work/core.img") + 511) / 512 ))
[ "$core_sectors" -lt 2047 ] || die "GRUB core.img ($core_sectors sectors) does not fit before the partition"
# boot.img's code (440 bytes, the partition table stays) loads sector 1; core.img's
# first sector then loads the rest from sector 2 on (both are GRUB's defaults).
dd if=/usr/lib/grub/i386-pc/boot.img of="$out" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$out" bs=512 seek=1 conv=notrunc status=none

if [ -n "$qcow2" ]; then
    step "converting to qcow2"
    qemu-img convert -O qcow2 "$out" "${out%.img}.qcow2"
fi
step "done"
used=$(du -k "$out" | cut -f1)
echo "image: $out ($size, $((used / 1024)) MiB used)${qcow2:+, ${out%.img}.qcow2}"
echo "boot it: qemu-system-x86_64 -m 512 -drive file=$out,format=raw,if=virtio -nic user,model=virtio-net-pci,hostfwd=tcp::2525-:25,hostfwd=tcp::8025-:8025 -nographic"
echo "built in $((SECONDS - step_start)) s"
