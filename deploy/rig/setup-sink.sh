#!/bin/sh
# Make a machine (or a chroot) a sink: the `spamsink` user, the systemd units of
# deploy/systemd/, the config file /etc/spamsink/spamsink.env, and the netfilter
# modules netdrop needs at boot. Run as root after install.sh.
#
#   setup-sink.sh [--config FILE] [--token TOKEN] [--start]
#
# --config  the settings (default: deploy/spamsink.env beside this script); an
#           existing /etc/spamsink/spamsink.env is replaced.
# --token   the API token; without it, an empty SPAMSINK_API_TOKEN in the config
#           gets a fresh random one, printed once here and stored only in the
#           config file (mode 0600, root).
# --start   (re)start the units now; without it they are only enabled (a chroot).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
config=$here/../spamsink.env token= start=
usage() { echo "usage: $0 [--config FILE] [--token TOKEN] [--start]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --config) [ $# -ge 2 ] || usage; config=$2; shift 2 ;;
        --token) [ $# -ge 2 ] || usage; token=$2; shift 2 ;;
        --start) start=1; shift ;;
        *) echo "setup-sink.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -r "$config" ] || { echo "setup-sink.sh: cannot read config file $config" >&2; exit 1; }

getent passwd spamsink >/dev/null ||
    useradd --system --user-group --home-dir /var/lib/spamsink --no-create-home \
        --shell /usr/sbin/nologin --comment "spamsink SMTP sink" spamsink

install -d -m 0755 /etc/spamsink
umask 077
current=$(sed -n 's/^SPAMSINK_API_TOKEN=//p' "$config" | tail -n 1)
if [ -z "$token" ] && [ -z "$current" ]; then
    token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    echo "API token (printed once, stored in /etc/spamsink/spamsink.env): $token"
fi
if [ -n "$token" ]; then
    grep -v '^SPAMSINK_API_TOKEN=' "$config" > /etc/spamsink/spamsink.env.new
    echo "SPAMSINK_API_TOKEN=$token" >> /etc/spamsink/spamsink.env.new
else
    cp "$config" /etc/spamsink/spamsink.env.new
fi
chmod 0600 /etc/spamsink/spamsink.env.new
mv /etc/spamsink/spamsink.env.new /etc/spamsink/spamsink.env
umask 022

install -m 0644 "$here/../systemd/spamsink.service" "$here/../systemd/netdrop.service" \
    /etc/systemd/system/
printf 'nfnetlink_queue\nxt_NFQUEUE\n' > /etc/modules-load.d/netdrop.conf

systemctl enable spamsink.service netdrop.service
if [ -n "$start" ]; then
    modprobe -a nfnetlink_queue xt_NFQUEUE 2>/dev/null || true
    systemctl daemon-reload
    systemctl restart spamsink.service netdrop.service
fi
