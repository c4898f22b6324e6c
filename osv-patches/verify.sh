#!/bin/bash
# Build OSv with the netdrop patch and measure the hook at run time under QEMU.
#
#   osv-patches/verify.sh OSV_CHECKOUT [BYTES]
#
# OSV_CHECKOUT: cloudius-systems/osv at the pinned commit (README.md), with the
# submodules kbuild, musl_1.2.1, musl_0.9.12 and external/x64/acpica checked out,
# and libboost-dev, bison, flex installed. The patch is applied unless it already
# is. The kernel is built with a read-only root and tcpsink.c (listens on 25 and
# 2526, reads each connection to EOF, answers the byte count) in its bootfs, then
# booted three times in QEMU (TCG): delay 100 ms, drop 5 %, drop 20 %, each on
# port 25 only. Each run sends BYTES (default 20000) five times to 2526 (untouched)
# and to 25 through QEMU's user-network port forwards and prints the seconds taken.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,4p' "$0" | sed 's/^# //' >&2; exit 2; }
osv=$(cd "$1" && pwd)
bytes=${2:-20000}
here=$(cd "$(dirname "$0")" && pwd)
patch=$(ls "$here"/0001-*.patch)
work=$(mktemp -d)
qemu_pid=
trap '[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null; rm -rf "$work"' EXIT

cd "$osv"
if git apply --reverse --check "$patch" 2>/dev/null; then
    echo "patch already applied"
else
    git apply "$patch"
fi
gcc -O2 -fPIE -pie -o "$work/tcpsink" "$here/tcpsink.c"
printf '[manifest]\n/tcpsink: %s\n' "$work/tcpsink" > h7-netdrop-bootfs.manifest
fs=rofs bootfs_manifest=h7-netdrop-bootfs.manifest make -j"$(nproc)" >"$work/make.log" 2>&1 \
    || { tail -20 "$work/make.log"; exit 1; }
rm -f h7-netdrop-bootfs.manifest

cat > "$work/send.py" <<'PY'
import socket, sys, time
def send(port: int, size: int) -> float:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        s.sendall(b"x" * size)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100).strip() == str(size).encode(), "sink did not get every byte"
    return time.monotonic() - start
size = int(sys.argv[3])
for port, name in ((int(sys.argv[2]), "2526 (untouched)"), (int(sys.argv[1]), "25 (netdrop)")):
    print(f"  port {name}: seconds per {size} bytes:",
          [round(send(port, size), 3) for _ in range(5)])
PY

run() {
    local img=$work/osv.img console=$work/console.log
    cp build/release.x64/loader.img "$img"
    python3 scripts/imgedit.py setargs "$img" "$1 /tcpsink 25 2526" 2>/dev/null
    : > "$console"
    qemu-system-x86_64 -accel tcg -m 512 -display none -no-reboot -serial "file:$console" \
        -drive "file=$img,format=raw,if=virtio" \
        -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:42625-:25,hostfwd=tcp:127.0.0.1:42626-:2526 &
    qemu_pid=$!
    for _ in $(seq 120); do grep -q 'listening on 2526' "$console" && break; sleep 0.5; done
    echo "== $1"
    python3 "$work/send.py" 42625 42626 "$bytes"
    kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=
}
run "--netdrop-rate=0 --netdrop-delay=100 --netdrop-ports=25"
run "--netdrop-rate=0.05 --netdrop-ports=25"
run "--netdrop-rate=0.2 --netdrop-ports=25"
