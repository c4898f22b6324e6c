"""A real Postfix (Debian's package) on a spare loopback port, as a reference peer.

Runs as its own instance (``postfix -c DIR``) with Debian 12's default ``main.cf``
settings for what a client can see, every transport set to ``discard`` and logging
to a file. Needs root and ``/usr/sbin/postfix``; callers skip otherwise.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import wait_for_port

POSTFIX = "/usr/sbin/postfix"

#: What Debian 12's postinst writes for an "Internet Site", as a client sees it.
DEBIAN_MAIN_CF = {
    "compatibility_level": "3.6",
    "smtpd_banner": "$myhostname ESMTP $mail_name (Debian/GNU)",
    "biff": "no",
    "append_dot_mydomain": "no",
    "readme_directory": "no",
    "smtpd_tls_security_level": "may",
    "smtpd_relay_restrictions": "permit_mynetworks permit_sasl_authenticated "
                                "defer_unauth_destination",
    "myhostname": "mx.example.com",
    "mydestination": "$myhostname, localhost",
    # Loopback must count as the Internet here, or Postfix would relay for it.
    "mynetworks": "192.0.2.0/24",
    "recipient_delimiter": "+",
    "inet_protocols": "ipv4",
    "alias_maps": "",
    "local_recipient_maps": "",
    "default_transport": "discard",
    "relay_transport": "discard",
    "local_transport": "discard",
    "maillog_file_prefixes": "/tmp,/var",
}


class RealPostfix:
    """A Postfix instance in ``base`` listening on 127.0.0.1:``port``."""

    def __init__(self, port: int, settings: dict[str, str] | None = None,
                 accept_all: bool = True) -> None:
        # Postfix's own users must reach the directory: pytest's tmp_path is 0700.
        base = self.base = Path(tempfile.mkdtemp(prefix="spamsink-postfix-", dir="/tmp"))
        self.port = port
        self.conf = base / "etc"
        self.log = base / "maillog"
        main = dict(DEBIAN_MAIN_CF)
        if accept_all:
            # The sink's default: every recipient accepted, as a relay for every domain.
            main["relay_domains"] = "static:ALL"
        main.update(settings or {})
        main.update({
            "queue_directory": str(base / "spool"),
            "data_directory": str(base / "data"),
            "inet_interfaces": "127.0.0.1",
            "maillog_file": str(self.log),
            "smtpd_tls_cert_file": str(base / "cert.pem"),
            "smtpd_tls_key_file": str(base / "key.pem"),
        })
        self.main = main

    def start(self) -> RealPostfix:
        base = self.base
        for sub in ("etc", "spool", "data"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(base / "key.pem"), "-out", str(base / "cert.pem"),
                        "-days", "2", "-subj", "/CN=mx.example.com"],
                       check=True, capture_output=True)
        (self.conf / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main.items()))
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        lines = [f"{self.port} inet n - n - - smtpd" if line.startswith("smtp ") and "inet" in line
                 else line for line in master]
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")
        result = subprocess.run([POSTFIX, "-c", str(self.conf), "start"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"postfix did not start: {result.stderr}\n{self.log_text()}")
        wait_for_port("127.0.0.1", self.port, timeout=15)
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True)
        time.sleep(0.3)
        shutil.rmtree(self.base, ignore_errors=True)
