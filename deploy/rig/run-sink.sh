#!/bin/sh
# Run what the two systemd units run, without systemd (a network namespace, a
# container): `spamsink serve` and, when NETDROP_RATE is above 0, `netdrop` in
# front of it, both with the settings of CONFIG. Stays in the foreground; on
# SIGTERM/SIGINT or when either exits, stops both (netdrop removes its rule).
#
#   run-sink.sh CONFIG        (as root for port 25 and netdrop)
#
# SPAMSINK_BIN: where the spamsink and netdrop programs are (default /opt/spamsink/bin).
set -eu

[ $# -eq 1 ] && [ -r "$1" ] || { echo "usage: $0 CONFIG (a readable spamsink.env)" >&2; exit 2; }
bin=${SPAMSINK_BIN:-/opt/spamsink/bin}
set -a
# shellcheck disable=SC1090
. "$1"
set +a

"$bin/spamsink" serve &
sink=$!
drop=
case ${NETDROP_RATE:-0} in
    0|0.0|0.00|"") ;;
    *) "$bin/netdrop" --rate "$NETDROP_RATE" --port "${NETDROP_PORT:-25}" & drop=$! ;;
esac

stop() { kill -TERM $drop $sink 2>/dev/null || true; }
trap 'stop; wait; exit 0' TERM INT
# Whichever ends first ends the rig.
while kill -0 $sink 2>/dev/null && { [ -z "$drop" ] || kill -0 "$drop" 2>/dev/null; }; do
    sleep 0.2
done
stop
status=0
wait $sink || status=$?
[ -n "$drop" ] && wait "$drop" 2>/dev/null
exit "$status"
