"""``netdrop``: drop and delay a fraction of inbound SMTP segments (run as root).

Argument parsing and wiring only: the rules (:mod:`netdrop.rules`), the consumer
(:mod:`netdrop.queue`), the policy (:mod:`netdrop.policy`), the flagged set
(:mod:`netdrop.flagged`), accounting (:mod:`netdrop.accounting`) and metrics
(:mod:`netdrop.metrics`) live in their own modules. Whatever way the process ends
(signal, error, normal exit), the rules it installed are removed.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from netdrop.policy import Network, PolicyConfig
from netdrop.rules import Rules, RulesError, RuleSpec
from sink.argtypes import count, fraction, port

log = logging.getLogger("netdrop")

DEFAULT_API = "http://127.0.0.1:8025"


class Shutdown(BaseException):
    """Raised by the signal handlers to leave the packet loop."""


class UsageError(Exception):
    """Bad option values (reported as one line, exit status 2)."""



def _delay(text: str) -> tuple[float, float]:
    base, _, jitter = text.partition(":")
    try:
        values = float(base), float(jitter or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MS or MS:JITTER in ms: {text!r}") from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"delays cannot be negative: {text!r}")
    return values




def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or network: {text!r}") from None


def _flag(text: str) -> str:
    from sink.record import Flag

    try:
        return Flag.parse(text).name.lower()  # type: ignore[union-attr]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netdrop",
        description="Drop or delay a fraction of inbound SMTP segments so senders pay in "
                    "retransmissions and time. Runs as root next to `spamsink serve`; "
                    "installs its firewall rule on start and removes it on exit. If netdrop "
                    "dies, traffic flows (queue bypass, fail open).",
        epilog="Examples: netdrop --rate 0.2 | netdrop --rate 0.1 --delay 300:100 "
               "--delay-rate 0.5 --only-flagged --flag pregreet | netdrop --kernel --rate 0.2")
    g = p.add_argument_group("what to do")
    g.add_argument("--rate", type=fraction, default=0.0, metavar="P",
                   help="drop this fraction of eligible segments [default: 0]")
    g.add_argument("--delay", type=_delay, default=None, metavar="MS[:JITTER]",
                   help="hold eligible segments MS milliseconds, +- JITTER (uniform)")
    g.add_argument("--delay-rate", type=fraction, default=None, metavar="P",
                   help="fraction of eligible, not dropped segments to hold "
                        "[default: 1 when --delay is given]")
    g.add_argument("--kernel", action="store_true",
                   help="random drop in the kernel only (nftables numgen), no userspace; "
                        "only with --rate (no delays, no per-sender policy or accounting)")
    g = p.add_argument_group("which segments")
    g.add_argument("--port", type=port, action="append", metavar="PORT",
                   help="destination port, repeatable [default: 25]")
    g.add_argument("--syn", action="store_true",
                   help="SYNs are eligible too (a dropped SYN costs a full retransmission timeout)")
    g.add_argument("--fin", action="store_true", help="FINs are eligible too")
    g.add_argument("--allow", type=_network, action="append", default=[], metavar="ADDR/NET",
                   help="never touch this address or network, repeatable (kept in the kernel)")
    g.add_argument("--only-flagged", action="store_true",
                   help="touch only senders in the flagged list (--flagged-file and/or the "
                        "sink's API), reloaded every --refresh seconds")
    g.add_argument("--flagged-file", type=Path, metavar="PATH",
                   help="flagged senders, one address per line, '#' comments")
    g.add_argument("--sink-api", metavar="URL",
                   help=f"the sink's HTTP API [default with --only-flagged and no "
                        f"--flagged-file: {DEFAULT_API}]")
    g.add_argument("--api-token", metavar="TOKEN", default=os.environ.get("NETDROP_API_TOKEN"),
                   help="bearer token for the sink's API [default: $NETDROP_API_TOKEN]")
    g.add_argument("--flag", type=_flag, action="append", default=[], metavar="NAME",
                   help="ask the API for senders with this flag, repeatable")
    g.add_argument("--min-messages", type=count, metavar="N",
                   help="ask the API for senders with at least N messages")
    g.add_argument("--refresh", type=float, default=5.0, metavar="SECONDS",
                   help="reload the flagged list this often [default: 5]")
    g = p.add_argument_group("queue and output")
    g.add_argument("--queue-num", type=count, default=0, metavar="N",
                   help="NFQUEUE number [default: 0]")
    g.add_argument("--queue-maxlen", type=count, default=4096, metavar="N",
                   help="kernel queue length; when full, packets pass [default: 4096]")
    g.add_argument("--max-held", type=count, default=1024, metavar="N",
                   help="at most N segments held for delays; more pass at once [default: 1024]")
    g.add_argument("--no-fail-open", dest="fail_open", action="store_false",
                   help="drop (instead of pass) packets when the kernel queue is full")
    g.add_argument("--mechanism", choices=("auto", "iptables", "nft"), default="auto",
                   help="how to feed the queue or drop in the kernel [default: auto: "
                        "iptables NFQUEUE for the queue, nftables for --kernel]")
    g.add_argument("--data", type=Path, metavar="DIR",
                   help="the sink's data directory: per-sender counts go to DIR/netdrop.sqlite")
    g.add_argument("--metrics", metavar="ADDR",
                   help="serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9125)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def _check(args: argparse.Namespace) -> None:
    if args.delay_rate is not None and args.delay is None:
        raise UsageError("--delay-rate needs --delay")
    if args.kernel and (args.delay or args.only_flagged or args.data):
        raise UsageError("--kernel only drops at random: leave out --delay, --only-flagged "
                         "and --data (or drop --kernel)")
    if args.kernel and args.rate <= 0:
        raise UsageError("--kernel needs --rate above 0")
    if (args.flagged_file or args.sink_api) and not args.only_flagged:
        raise UsageError("--flagged-file and --sink-api need --only-flagged")
    if args.max_held >= args.queue_maxlen:
        raise UsageError("--max-held must be below --queue-maxlen (held packets stay queued)")
    if args.refresh <= 0:
        raise UsageError("--refresh must be above 0")
    if args.metrics and not args.metrics.rpartition(":")[2].isdigit():
        raise UsageError(f"--metrics: expected HOST:PORT, got {args.metrics!r}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Shutdown(signum)


def _install_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def _ignore_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _spec(args: argparse.Namespace) -> RuleSpec:
    return RuleSpec(ports=tuple(dict.fromkeys(args.port or [25])), queue_num=args.queue_num,
                    syn=args.syn, fin=args.fin, allow=tuple(args.allow))


def _cleanup(rules: Rules) -> None:
    if rules.cleanup():
        log.warning("netdrop: removed leftover rules of an earlier run (queue %d)",
                    rules.spec.queue_num)


def _run_kernel(args: argparse.Namespace, rules: Rules) -> int:
    from netdrop import metrics

    _cleanup(rules)
    rules.install_kernel_drop(args.rate)
    log.info("netdrop: kernel drop %.3f of segments to port(s) %s via %s",
             args.rate, ",".join(map(str, rules.spec.ports)), rules.used)
    if args.metrics:
        metrics.serve(args.metrics, metrics.KernelCollector(rules.eligible, rules.packets))
    try:
        while True:
            signal.pause()
    except Shutdown:
        pass
    log.info("netdrop: kernel rule saw %d segments, dropped %d",
             rules.eligible(), rules.packets())
    return 0


def _run_queue(args: argparse.Namespace, rules: Rules) -> int:
    from netdrop import metrics
    from netdrop.accounting import Ledger, SqliteWriter
    from netdrop.flagged import FlaggedSource, Refresher, export_url
    from netdrop.policy import Policy
    from netdrop.queue import Consumer, QueueConfig

    delay_ms, jitter_ms = args.delay or (0.0, 0.0)
    delay_rate = args.delay_rate if args.delay_rate is not None else (1.0 if args.delay else 0.0)
    policy = Policy(PolicyConfig(rate=args.rate, delay_ms=delay_ms, jitter_ms=jitter_ms,
                                 delay_rate=delay_rate, syn=args.syn, fin=args.fin,
                                 only_flagged=args.only_flagged, allow=tuple(args.allow)))
    refresher = None
    if args.only_flagged:
        url = args.sink_api or (None if args.flagged_file else DEFAULT_API)
        source = FlaggedSource(args.flagged_file,
                               export_url(url, args.flag, args.min_messages) if url else None,
                               args.api_token)
        refresher = Refresher(source, policy.set_flagged, args.refresh)
    writer = SqliteWriter(args.data / "netdrop.sqlite") if args.data else None
    consumer = Consumer(policy, QueueConfig(queue_num=args.queue_num,
                                            queue_maxlen=args.queue_maxlen,
                                            max_held=args.max_held, fail_open=args.fail_open),
                        Ledger(), writer)
    try:
        consumer.bind()  # fails if a live netdrop serves this queue: its rules stay
        _cleanup(rules)
        if refresher is not None:
            refresher.start()
        if args.metrics:
            metrics.serve(args.metrics, metrics.QueueCollector(
                consumer.totals, args.queue_num, lambda: len(policy.flagged)))
        rules.install_queue()
        log.info("netdrop: queue %d on port(s) %s via %s: drop %.3f, delay %s ms on %.3f%s",
                 args.queue_num, ",".join(map(str, rules.spec.ports)), rules.used, args.rate,
                 f"{delay_ms:g}+-{jitter_ms:g}", delay_rate,
                 ", only flagged senders" if args.only_flagged else "")
        consumer.run()
    except Shutdown:
        pass
    finally:
        _ignore_signals()
        rules.remove()
        consumer.close()
        if refresher is not None:
            refresher.stop()
        if writer is not None:
            writer.close()
    t = consumer.totals
    log.info("netdrop: seen %d, passed %d, dropped %d, delayed %d, overflow %d, other %d",
             t.seen, t.passed, t.dropped, t.delayed, t.overflow, t.other)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    try:
        _check(args)
    except UsageError as exc:
        parser.exit(2, f"netdrop: error: {exc}\n")
    if os.geteuid() != 0:
        print("netdrop: needs root (CAP_NET_ADMIN) to install firewall rules and read the "
              "queue; run it with sudo", file=sys.stderr)
        return 1
    if not args.kernel:
        try:
            import netfilterqueue  # noqa: F401
        except ImportError:
            print("netdrop: the NetfilterQueue binding is missing: pip install "
                  "'spamsink[netdrop]' (needs libnetfilter-queue-dev); or use --kernel",
                  file=sys.stderr)
            return 1
    rules = Rules(_spec(args), args.mechanism)
    atexit.register(rules.remove)
    _install_signals()
    try:
        return _run_kernel(args, rules) if args.kernel else _run_queue(args, rules)
    except Shutdown:
        return 0
    except RulesError as exc:
        print(f"netdrop: cannot install rules: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from netdrop.queue import QueueError

        if isinstance(exc, QueueError):
            print(f"netdrop: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        _ignore_signals()
        rules.remove()


if __name__ == "__main__":
    sys.exit(main())
