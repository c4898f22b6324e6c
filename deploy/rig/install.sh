#!/bin/sh
# Install spamsink (with netdrop) into a virtualenv, by default /opt/spamsink.
#
#   install.sh --wheels DIR    offline, from wheels built with `pip wheel` (the VM image)
#   install.sh SOURCE_DIR      from a checkout, dependencies from PyPI (Vagrant)
#
# Installs the Debian packages it needs first when apt-get is there and they are
# missing. Idempotent: a second run upgrades the venv in place. Run as root.
set -eu

PREFIX=${SPAMSINK_PREFIX:-/opt/spamsink}
usage() { echo "usage: $0 [--prefix DIR] (--wheels DIR | SOURCE_DIR)" >&2; exit 2; }

wheels= source=
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
        --prefix) [ $# -ge 2 ] || usage; PREFIX=$2; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "install.sh: unknown option $1" >&2; usage ;;
        *) source=$1; shift ;;
    esac
done
[ -n "$wheels$source" ] || usage

# Runtime packages; a source install also builds NetfilterQueue against libnetfilter-queue.
need="python3 python3-venv iptables libnetfilter-queue1"
[ -n "$source" ] && need="$need gcc python3-dev libnetfilter-queue-dev"
missing=
for pkg in $need; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "install.sh: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

[ -x "$PREFIX/bin/python" ] || python3 -m venv "$PREFIX"
if [ -n "$wheels" ]; then
    "$PREFIX/bin/pip" install -q --no-index --find-links "$wheels" --upgrade 'spamsink[netdrop]'
else
    "$PREFIX/bin/pip" install -q --upgrade "$source[netdrop]"
fi
"$PREFIX/bin/spamsink" version
