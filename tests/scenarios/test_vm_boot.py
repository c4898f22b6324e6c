"""The VM image end to end: build it, boot it in QEMU, mail it, read the sender back.

``deploy/image/build.sh`` builds the real image (debootstrap, GRUB in the MBR, the
units of deploy/systemd/); QEMU boots it from its own bootloader with software
emulation (TCG) and user networking that forwards a local port to the VM's 25 and
one to its API. swaks sends a message through netdrop into the sink; the API (with
the token the build generated and printed) must show the sender, and still show it
after the VM is shut down and booted again from the same disk.

Takes minutes (see README "Run it as a VM" for measured times), so it runs only with
SPAMSINK_VM_TEST=1, as root, with qemu-system-x86_64, debootstrap and swaks.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, free_port, need_root, need_tool

pytestmark = pytest.mark.slow

BUILD = REPO / "deploy" / "image" / "build.sh"
SENDER = "vm-boot-test@sender.example"
# What the guest sees as the client address behind QEMU's user networking.
SLIRP_HOST = "10.0.2.2"
BOOT_TIMEOUT = 600.0


def _need_vm_test() -> None:
    if os.environ.get("SPAMSINK_VM_TEST") != "1":
        pytest.skip("builds and boots a VM image for minutes: set SPAMSINK_VM_TEST=1 to run")
    need_root()
    for tool in ("qemu-system-x86_64", "debootstrap", "swaks"):
        need_tool(tool)


class VM:
    """One QEMU process booting the image, with SMTP and API forwarded to loopback."""

    def __init__(self, image: Path, log: Path) -> None:
        self.image = image
        self.log = log
        self.smtp_port = free_port()
        self.api_port = free_port()
        self.monitor = log.with_suffix(".monitor")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VM:
        forwards = (f"hostfwd=tcp:127.0.0.1:{self.smtp_port}-:25,"
                    f"hostfwd=tcp:127.0.0.1:{self.api_port}-:8025")
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "768", "-smp", "2",
             "-drive", f"file={self.image},format=raw,if=virtio",
             "-nic", f"user,model=virtio-net-pci,{forwards}",
             "-display", "none", "-serial", f"file:{self.log}",
             "-monitor", f"unix:{self.monitor},server,nowait"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def console(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-3000:]

    def wait_for_banner(self) -> float:
        """Seconds until the sink's 220 banner comes through the forward."""
        start = time.monotonic()
        while time.monotonic() - start < BOOT_TIMEOUT:
            assert self.proc is not None and self.proc.poll() is None, \
                f"QEMU exited: {self.proc.stderr.read().decode() if self.proc else ''}"
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=10) as s:
                    s.settimeout(20)
                    if s.recv(512).startswith(b"220 "):
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"no SMTP banner after {BOOT_TIMEOUT} s; console:\n{self.console()}")

    def power_down(self, timeout: float = 180.0) -> None:
        """ACPI power button, as a cloud's stop does; the guest shuts down cleanly."""
        assert self.proc is not None
        with socket.socket(socket.AF_UNIX) as mon:
            mon.connect(str(self.monitor))
            mon.sendall(b"system_powerdown\n")
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"guest did not power off in {timeout} s; "
                                     f"console:\n{self.console()}") from None
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _api(vm: VM, path: str, token: str | None) -> tuple[int, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{vm.api_port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _wait_for_sender(vm: VM, token: str, timeout: float = 120.0) -> object:
    """The /api/v1/ips answer once it lists the QEMU host address as a sender."""
    deadline = time.monotonic() + timeout
    body: object = None
    while time.monotonic() < deadline:
        try:
            status, body = _api(vm, "/api/v1/ips", token)
        except OSError:
            status = 0
        if status == 200 and SLIRP_HOST in json.dumps(body):
            return body
        time.sleep(2)
    raise AssertionError(f"sender {SLIRP_HOST} not in /api/v1/ips: {body!r}")


@pytest.fixture
def vms() -> Iterator[list[VM]]:
    started: list[VM] = []
    yield started
    for vm in started:
        vm.kill()


def test_image_boots_into_the_sink_and_keeps_senders_across_reboot(
        tmp_path: Path, vms: list[VM]) -> None:
    _need_vm_test()
    config = tmp_path / "spamsink.env"
    config.write_text((REPO / "deploy" / "spamsink.env").read_text())
    image = tmp_path / "spamsink.img"

    started = time.monotonic()
    build = subprocess.run(["bash", str(BUILD), "--config", str(config), "--out", str(image)],
                           capture_output=True, text=True, timeout=1800)
    build_seconds = time.monotonic() - started
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tokens = re.findall(r"^API token \(printed once[^:]*: ([0-9a-f]{48})$", build.stdout, re.M)
    assert len(tokens) == 1, f"expected the generated token printed once:\n{build.stdout}"
    token = tokens[0]

    vm = VM(image, tmp_path / "console-1.log").start()
    vms.append(vm)
    first_boot = vm.wait_for_banner()

    swaks = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{vm.smtp_port}", "--from", SENDER,
         "--to", "postmaster@example.org", "--timeout", "120"],
        capture_output=True, text=True, timeout=300)
    assert swaks.returncode == 0, swaks.stdout[-2000:]
    assert "250 2.0.0 Ok: queued as" in swaks.stdout

    assert _api(vm, "/api/v1/ips", None)[0] == 401, "the API must want the token"
    _wait_for_sender(vm, token)
    vm.power_down()

    vm = VM(image, tmp_path / "console-2.log").start()
    vms.append(vm)
    second_boot = vm.wait_for_banner()
    body = _wait_for_sender(vm, token, timeout=60)
    vm.power_down()

    print(f"\nvm image: build {build_seconds:.0f} s, first boot to SMTP banner "
          f"{first_boot:.0f} s, second boot {second_boot:.0f} s (TCG); after reboot: "
          f"{json.dumps(body)[:300]}")
