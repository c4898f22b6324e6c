#!/bin/sh
# Configure a fresh debootstrap root into a small cloud-style base for spamsink.
# Runs inside the chroot, once per package list (build.sh caches the result).
set -eu

# No documentation, manuals or translations, now or in later apt installs.
cat > /etc/dpkg/dpkg.cfg.d/01-spamsink-nodoc <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/*/

# initrd with the disk, network and filesystem drivers clouds and QEMU use, not all of them.
cat > /etc/initramfs-tools/conf.d/spamsink <<'CFG'
MODULES=list
COMPRESS=zstd
CFG
cat > /etc/initramfs-tools/modules <<'CFG'
virtio_pci
virtio_blk
virtio_scsi
virtio_net
sd_mod
nvme
ata_piix
ahci
xen_blkfront
ext4
CFG
update-initramfs -u -k all

echo spamsink > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tspamsink\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
# A new machine id on first boot of every copy of the image.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id

# DHCP on every Ethernet interface.
mkdir -p /etc/systemd/network
cat > /etc/systemd/network/80-dhcp.network <<'CFG'
[Match]
Type=ether

[Network]
DHCP=yes
CFG
systemctl enable systemd-networkd.service
# The sink binds the wildcard address: nothing waits for the network to be "online".
systemctl disable systemd-networkd-wait-online.service 2>/dev/null || true
# Keep the journal on the disk, small.
mkdir -p /var/log/journal /etc/systemd/journald.conf.d
printf '[Journal]\nSystemMaxUse=64M\n' > /etc/systemd/journald.conf.d/spamsink.conf

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/*.log
