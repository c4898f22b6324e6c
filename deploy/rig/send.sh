#!/bin/sh
# The sender side of the rig: `spamsink send` N messages to the sink.
#
#   send.sh SINK_HOST [N] [PORT]      (defaults: 100 messages, port 25)
#
# SPAMSINK_BIN: where the spamsink program is (default /opt/spamsink/bin).
set -eu
usage() { echo "usage: $0 SINK_HOST [N] [PORT]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in -*) usage ;; esac
bin=${SPAMSINK_BIN:-/opt/spamsink/bin}
exec "$bin/spamsink" send -n "${2:-100}" -p "${3:-25}" "$1"
