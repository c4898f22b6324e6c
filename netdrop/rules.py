"""The firewall rules netdrop owns: install on start, remove on every exit.

Two jobs, each with a preferred mechanism and a fallback:

* **queue** — send inbound TCP to the SMTP ports into NFQUEUE ``queue_num``, with
  bypass (no consumer bound: packets pass). Preferred: the xtables ``NFQUEUE`` target
  (``iptables`` and ``ip6tables``) in a chain of our own, ``netdrop-q<N>``, jumped to
  from ``INPUT``. Fallback: nftables' ``queue`` statement in an *owner* table (vanishes
  with the process); it needs ``CONFIG_NFT_QUEUE``, which some kernels lack.
* **kernel** — drop a random fraction in the kernel, no userspace verdicts. Preferred:
  nftables ``numgen random`` in an owner table ``inet netdrop_k<N>`` (the kernel deletes
  it when netdrop dies, even on SIGKILL). Fallback: the xtables ``statistic`` match.

Allowlisted networks and RST segments never reach the queue or the drop rule; SYN and
FIN segments only when asked. Leftovers of an earlier run with the same queue number
are removed before installing. Every failure is a :class:`RulesError` with one line.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from netdrop.nft import Nft, NftError
from netdrop.policy import Network

log = logging.getLogger("netdrop")


class RulesError(Exception):
    """The rules could not be installed; the message says why and what to do."""


@dataclass(frozen=True)
class RuleSpec:
    """What the rules match."""

    ports: tuple[int, ...] = (25,)
    queue_num: int = 0
    syn: bool = False
    fin: bool = False
    allow: tuple[Network, ...] = field(default_factory=tuple)

    @property
    def chain(self) -> str:
        return f"netdrop-q{self.queue_num}"

    @property
    def table(self) -> str:
        return f"netdrop_k{self.queue_num}"


def _which(names: Sequence[str]) -> str | None:
    for name in names:
        for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
            if candidate and shutil.which(candidate):
                return candidate
    return None


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise RulesError(f"{' '.join(cmd)}: {message[0] if message else 'failed'}")
    return proc


class Xtables:
    """Our chain in the filter table of one family (``iptables`` or ``ip6tables``)."""

    def __init__(self, tool: str, version: int, spec: RuleSpec) -> None:
        self.tool = tool
        self.version = version
        self.spec = spec

    def _t(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([self.tool, "-w", "5", *args], check=check)

    def exists(self) -> bool:
        return self._t("-n", "-L", self.spec.chain, check=False).returncode == 0

    def remove(self) -> bool:
        """Remove the jump and the chain if present; True if anything was removed."""
        removed = False
        for _ in range(100):
            if self._t("-D", "INPUT", "-j", self.spec.chain, check=False).returncode != 0:
                break
            removed = True
        if self.exists():
            self._t("-F", self.spec.chain, check=False)
            self._t("-X", self.spec.chain, check=False)
            removed = True
        return removed

    def install(self, target: Sequence[str]) -> None:
        """Create the chain ending in ``target`` for the matching segments, then jump to it."""
        s, chain = self.spec, self.spec.chain
        self._t("-N", chain)
        for net in s.allow:
            if net.version == self.version:
                self._t("-A", chain, "-s", str(net), "-j", "RETURN")
        self._t("-A", chain, "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "RETURN")
        if not s.syn:
            self._t("-A", chain, "-p", "tcp", "--tcp-flags", "SYN", "SYN", "-j", "RETURN")
        if not s.fin:
            self._t("-A", chain, "-p", "tcp", "--tcp-flags", "FIN", "FIN", "-j", "RETURN")
        ports = ",".join(str(p) for p in s.ports)
        self._t("-A", chain, "-p", "tcp", "-m", "multiport", "--dports", ports, *target)
        self._t("-I", "INPUT", "1", "-j", chain)

    def packets(self) -> int:
        """Packets that reached the final (queue or drop) rule of our chain."""
        out = self._t("-n", "-v", "-x", "-L", self.spec.chain).stdout.splitlines()
        last = [line for line in out[2:] if line.strip()][-1]
        return int(last.split()[0])


def _nft_table(spec: RuleSpec, verdict: str) -> str:
    """An owner table whose input chain applies ``verdict`` to the matching segments."""
    mask = ["rst"] + ([] if spec.syn else ["syn"]) + ([] if spec.fin else ["fin"])
    allow4 = ", ".join(str(n) for n in spec.allow if n.version == 4)
    allow6 = ", ".join(str(n) for n in spec.allow if n.version == 6)
    ports = ", ".join(str(p) for p in spec.ports)
    lines = [f"add table inet {spec.table} {{ flags owner; }}",
             f"add chain inet {spec.table} input {{ type filter hook input priority -10; }}"]
    rule = f"add rule inet {spec.table} input"
    if allow4:
        lines.append(f"{rule} ip saddr {{ {allow4} }} return")
    if allow6:
        lines.append(f"{rule} ip6 saddr {{ {allow6} }} return")
    match = f"tcp dport {{ {ports} }} tcp flags & ({' | '.join(mask)}) == 0"
    lines.append(f"{rule} {match} counter")
    lines.append(f"{rule} {match} {verdict}")
    return "\n".join(lines) + "\n"


class Rules:
    """Installs one job's rules with the best working mechanism; :meth:`remove` undoes it."""

    def __init__(self, spec: RuleSpec, mechanism: str = "auto") -> None:
        self.spec = spec
        self.mechanism = mechanism
        self.used = ""
        self._xt: list[Xtables] = []
        self._nft: Nft | None = None
        v4 = _which(["iptables", "iptables-nft", "iptables-legacy"])
        v6 = _which(["ip6tables", "ip6tables-nft", "ip6tables-legacy"])
        self._tools = [(t, v) for t, v in ((v4, 4), (v6, 6)) if t]

    def _xtables(self) -> list[Xtables]:
        return [Xtables(tool, version, self.spec) for tool, version in self._tools]

    def cleanup(self) -> bool:
        """Remove leftovers of an earlier run with this queue number; True if there were."""
        found = False
        for xt in self._xtables():
            found |= xt.remove()
        try:
            nft = Nft()
        except NftError:
            return found
        try:
            nft.run(f"delete table inet {self.spec.table}")
            found = True
        except NftError:
            try:
                nft.run(f"list table inet {self.spec.table}")
            except NftError:
                return found  # no such table
            raise RulesError(f"table inet {self.spec.table} belongs to another running "
                             f"netdrop (use another --queue-num)") from None
        finally:
            nft.close()
        return found

    def install_queue(self) -> None:
        """Feed the queue; raises :class:`RulesError` when no mechanism works."""
        target = ["-j", "NFQUEUE", "--queue-num", str(self.spec.queue_num), "--queue-bypass"]
        self._install(target, f"queue num {self.spec.queue_num} bypass",
                      "the NFQUEUE target (iptables)",
                      "nftables queue (needs CONFIG_NFT_QUEUE)")

    def install_kernel_drop(self, rate: float) -> None:
        """Drop ``rate`` of the matching segments in the kernel."""
        scale = 1_000_000
        threshold = round(rate * scale)
        self._install(["-m", "statistic", "--mode", "random", "--probability", f"{rate:.6f}",
                       "-j", "DROP"],
                      f"numgen random mod {scale} < {threshold} counter drop",
                      "the xtables statistic match (if netdrop is SIGKILLed the drop rule "
                      "stays until the next start)",
                      "nftables numgen random", prefer_nft=True)

    def _install(self, xt_target: list[str], nft_verdict: str, xt_name: str, nft_name: str,
                 prefer_nft: bool = False) -> None:
        order = ["nft", "xtables"] if prefer_nft else ["xtables", "nft"]
        if self.mechanism != "auto":
            order = [{"iptables": "xtables"}.get(self.mechanism, self.mechanism)]
        errors = []
        for mechanism in order:
            try:
                if mechanism == "xtables":
                    self._install_xt(xt_target)
                    self.used = xt_name
                else:
                    self._install_nft(nft_verdict)
                    self.used = nft_name
            except RulesError as exc:
                errors.append(f"{xt_name if mechanism == 'xtables' else nft_name}: {exc}")
                self.remove()
                continue
            if errors:
                log.warning("netdrop: %s failed; using %s instead", errors[0], self.used)
            return
        raise RulesError("no mechanism works: " + "; ".join(errors))

    def _install_xt(self, target: list[str]) -> None:
        if not self._tools:
            raise RulesError("neither iptables nor ip6tables found (apt install iptables)")
        if len(self._tools) == 1:
            log.warning("netdrop: %s not found; IPv%d traffic is not covered",
                        "ip6tables" if self._tools[0][1] == 4 else "iptables",
                        6 if self._tools[0][1] == 4 else 4)
        self._xt = []
        for xt in self._xtables():
            self._xt.append(xt)
            try:
                xt.install(target)
            except RulesError as exc:
                if xt.version == 4 or len(self._tools) == 1:
                    raise
                # A host without IPv6 (ipv6.disable=1): keep IPv4 covered, say so.
                log.warning("netdrop: IPv6 traffic is not covered: %s", exc)
                xt.remove()
                self._xt.remove(xt)

    def _install_nft(self, verdict: str) -> None:
        try:
            self._nft = Nft()
            self._nft.run(_nft_table(self.spec, verdict))
        except NftError as exc:
            raise RulesError(str(exc)) from None

    def packets(self) -> int:
        """Packets that reached the queue or drop rule so far (kernel counters)."""
        if self._nft is not None:
            out = self._nft.run(f"list table inet {self.spec.table}")
            counts = [int(line.split("packets")[1].split()[0]) for line in out.splitlines()
                      if "counter packets" in line]
            return counts[-1] if counts else 0
        return sum(xt.packets() for xt in self._xt)

    def eligible(self) -> int:
        """Kernel mode with nftables: segments the drop rule was applied to (counter)."""
        if self._nft is None:
            return 0
        out = self._nft.run(f"list table inet {self.spec.table}")
        counts = [int(line.split("packets")[1].split()[0]) for line in out.splitlines()
                  if "counter packets" in line]
        return counts[0] if counts else 0

    def remove(self) -> None:
        """Remove whatever this object installed (idempotent, never raises)."""
        for xt in self._xt:
            try:
                xt.remove()
            except (RulesError, OSError) as exc:
                log.warning("netdrop: could not remove %s rules: %s", xt.tool, exc)
        self._xt = []
        if self._nft is not None:
            with contextlib.suppress(NftError):
                self._nft.run(f"delete table inet {self.spec.table}")
            self._nft.close()
            self._nft = None
