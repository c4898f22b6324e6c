"""Command line of ``spamsink``: argument parsing and wiring only.

Every long option of every subcommand can also be set in the environment as
``SPAMSINK_<NAME>`` (upper case, dashes as underscores); the command line wins.
Repeatable options take a comma-separated list there.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sink import __version__, argtypes, engine_build

# The engine's modules are imported where serve needs them, not here: `spamsink send`
# and `spamsink ips` start ~20 ms sooner without them.

ENV_PREFIX = "SPAMSINK_"
_ENV_LIST = "_env_list_"
_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off", "")






def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from sink.persona import PERSONAS
    from sink.tarpit import PRESETS, WHO

    parser = subparsers.add_parser(
        "serve",
        help="run the SMTP sink",
        description="Accept every message as Debian's Postfix would, discard it, and "
        "remember the sender. Every option can also be set as SPAMSINK_<OPTION>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    listen = parser.add_argument_group("listening")
    listen.add_argument("--smtp", action="append", metavar="ADDR",
                        help="plain SMTP (with STARTTLS) listener, repeatable; ':25' is every "
                        "address, '127.0.0.1:2525' or '[::1]:2525' one [default: :25]")
    listen.add_argument("--smtps", action="append", metavar="ADDR", default=None,
                        help="implicit-TLS listener (port 465 style), repeatable")
    listen.add_argument("--workers", type=argtypes.positive_int, default=1,
                        help="processes sharing the ports with SO_REUSEPORT")
    listen.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    listen.add_argument("--backlog", type=argtypes.positive_int, default=1024,
                        help="listen() backlog per socket")
    listen.add_argument("--grace", type=argtypes.seconds, default=10.0,
                        help="on SIGTERM, seconds open sessions get to finish")

    identity = parser.add_argument_group("identity and policy")
    identity.add_argument("--hostname", default=None,
                          help="name in the banner and replies [default: this machine's FQDN]")
    identity.add_argument("--persona", default="postfix", choices=sorted(PERSONAS),
                          help="which MTA to imitate")
    identity.add_argument("--domains", default=None, metavar="LIST",
                          help="comma-separated domains to accept mail for; others are answered "
                          "as a relay attempt [default: accept every domain]")
    identity.add_argument("--data", type=Path, default=None, metavar="DIR",
                          help="directory for the SQLite store and TLS key "
                          "[default: $STATE_DIRECTORY or ~/.local/share/spamsink]")

    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-cert", type=Path, default=None,
                     help="certificate chain (PEM); default: a self-signed one in --data")
    tls.add_argument("--tls-key", type=Path, default=None, help="private key (PEM)")
    tls.add_argument("--no-starttls", dest="starttls", action="store_false",
                     help="do not offer STARTTLS")

    limits = parser.add_argument_group("limits (defaults: the persona's)")
    limits.add_argument("--max-line-length", type=argtypes.positive_int, default=None,
                        help="command line length; the rest of a longer line is discarded")
    limits.add_argument("--max-message-size", type=argtypes.size, default=None,
                        help="bytes per message, advertised in SIZE")
    limits.add_argument("--max-recipients", type=argtypes.positive_int, default=None,
                        help="recipients per message")
    limits.add_argument("--max-commands", type=argtypes.positive_int, default=10_000,
                        help="commands per session")
    limits.add_argument("--max-errors", type=argtypes.positive_int, default=None,
                        help="errors before the persona's 421 and a close")
    limits.add_argument("--idle-timeout", type=argtypes.seconds, default=None,
                        help="seconds without input before the persona's 421 timeout")
    limits.add_argument("--max-session-time", type=argtypes.seconds, default=3600.0,
                        help="seconds a session may last in total")
    limits.add_argument("--max-connections", type=argtypes.positive_int, default=20_000,
                        help="open connections per process; more get the persona's 421")
    limits.add_argument("--max-connections-per-ip", type=argtypes.positive_int, default=50,
                        help="open connections per client address")
    limits.add_argument("--max-buffer", type=argtypes.size, default=65536,
                        help="bytes of unanswered input or unsent output held per connection")

    pacing = parser.add_argument_group("tarpit")
    pacing.add_argument("--tarpit", default="off", choices=sorted(PRESETS),
                        help="pacing preset: off, polite, spamd (1 byte/s), max")
    pacing.add_argument("--greeting-delay", type=argtypes.seconds, default=None,
                        help="seconds before the banner")
    pacing.add_argument("--reply-delay", type=argtypes.seconds, default=None,
                        help="seconds before each command reply")
    pacing.add_argument("--data-delay", type=argtypes.seconds, default=None,
                        help="seconds before the reply to the end of a message")
    pacing.add_argument("--stutter", type=float, default=None, metavar="BYTES_PER_S",
                        help="send replies at this many bytes per second (0 = off)")
    pacing.add_argument("--jitter", type=argtypes.fraction, default=None,
                        help="random spread of every delay, as a fraction of it")
    pacing.add_argument("--pregreet-wait", type=argtypes.seconds, default=None,
                        help="send a postscreen-style '220-' teaser and the banner this many "
                        "seconds later; input before the banner flags the client as an early "
                        "talker (0 = no teaser) [default: the preset's]")
    pacing.add_argument("--tarpit-who", choices=WHO, default="flagged",
                        help="'flagged': only senders with a bot signal (early talk, unasked "
                        "pipelining, bare LF, non-SMTP, AUTH or relay attempts) or a bad record "
                        "(repeat visits) are paced, first-time well-behaved senders get "
                        "Postfix's timing; 'all': every sender is paced")
    pacing.add_argument("--known-bad-sessions", type=argtypes.positive_int, default=10,
                        help="sessions from one address after which it is paced from connect")
    pacing.add_argument("--max-tarpitted", type=argtypes.positive_int, default=10_000,
                        help="paced sessions at once per process; beyond it, normal pacing")
    pacing.add_argument("--write-budget", type=argtypes.count, default=5_000,
                        metavar="WRITES_PER_S",
                        help="stuttered bytes per second at most, for the whole sink (each of "
                        "--workers gets its share; 0 = no limit); beyond it every stuttering "
                        "session waits its turn, so thousands of them cost no more CPU than "
                        "this many bytes a second (delayed replies are released outside it)")
    pacing.add_argument("--tcp-info", action="store_true",
                        help="record every session's TCP segments and retransmissions (the "
                        "kernel's TCP_INFO at close) even when no tarpit feature is on; "
                        "with any of them on (pacing, the teaser, socket costs, greylisting) "
                        "they are always recorded. Costs ~10 us of CPU per connection")
    pacing.add_argument("--hold-cap", type=argtypes.seconds, default=600.0,
                        help="seconds of pacing per session at most; each reply also stays "
                        "under RFC 5321's client timeout for its stage (5 min greeting and "
                        "commands, 2 min DATA, 10 min after the message)")
    pacing.add_argument("--greylist", action="store_true",
                        help="answer the first (client /24, sender, recipient) 450 as postgrey "
                        "does and record who retries")
    pacing.add_argument("--greylist-delay", type=argtypes.seconds, default=300.0,
                        help="seconds before a retry of a greylisted triple is accepted")

    costs = parser.add_argument_group(
        "socket costs (Linux)",
        "--mss and --rcvbuf are set on the listening socket and so apply to every session; "
        "--window-clamp and --drop-rate apply to tarpitted sessions only, or to all with "
        "--socket-costs-for all. --drop-rate needs root or CAP_NET_ADMIN.")
    costs.add_argument("--mss", type=int, default=None, metavar="BYTES",
                       help="TCP_MAXSEG advertised to clients (88-65535): they must send "
                       "segments this small")
    costs.add_argument("--rcvbuf", type=argtypes.size, default=None,
                       help="SO_RCVBUF of the listener (kernel minimum 2304 after doubling): a "
                       "small receive window for every client")
    costs.add_argument("--window-clamp", type=argtypes.size, default=None,
                       help="a small receive window per connection (SO_RCVBUF and "
                       "TCP_WINDOW_CLAMP on the accepted socket, minimum 1152); the window "
                       "already offered stays, so it bites beyond the first ~64 KB")
    costs.add_argument("--drop-rate", type=argtypes.fraction, default=0.0, metavar="P",
                       help="drop this fraction of the client's packets with a BPF socket "
                       "filter so it must retransmit (for hosts where netdrop cannot run)")
    costs.add_argument("--socket-costs-for", choices=("tarpitted", "all"), default="tarpitted",
                       help="who gets --window-clamp and --drop-rate")

    memory = parser.add_argument_group("recording and HTTP API")
    memory.add_argument("--api", default="127.0.0.1:8025", metavar="ADDR",
                        help="HTTP API, exports and /metrics; 'off' for none. Listening "
                        "beyond loopback needs --api-token")
    memory.add_argument("--api-token", default=None, metavar="TOKEN",
                        help="require 'Authorization: Bearer TOKEN' on every API request "
                        "(DELETE always needs one)")
    memory.add_argument("--api-token-file", default=None, metavar="FILE",
                        help="read the API token from the first line of FILE")
    memory.add_argument("--retain-sessions", type=argtypes.seconds, default="30d",
                        metavar="DURATION", help="delete sessions older than this (per-sender "
                        "aggregates are kept); 0 keeps them forever")
    memory.add_argument("--no-record", dest="record", action="store_false",
                        help="record nothing (no store writes; the API still serves the store)")

    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-format", choices=("text", "json"), default="text",
                      help="format of log lines, including the one per session")
    logs.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                      default="info", help="'warning' silences the per-session lines")
    parser.set_defaults(handler=_run_serve)


def _settings(args: argparse.Namespace, argv: Sequence[str]):  # -> server.Settings
    from sink.persona import get_persona
    from sink.server import ListenAddress, Settings, default_data_dir
    from sink.smtp import Limits
    from sink.sockopts import SocketCosts
    from sink.tarpit import Policy, pacing_from_options

    persona = get_persona(args.persona)
    for option, value in (("--idle-timeout", args.idle_timeout),
                          ("--max-session-time", args.max_session_time)):
        if value is not None and value <= 0:
            raise ValueError(f"{option} must be more than 0 seconds")
    limits = Limits(
        line_length=args.max_line_length or persona.line_length_limit,
        message_size=args.max_message_size or persona.message_size_limit,
        recipients=args.max_recipients or persona.recipient_limit,
        commands=args.max_commands,
        errors=args.max_errors or persona.hard_error_limit,
        idle_timeout=args.idle_timeout if args.idle_timeout is not None else persona.idle_timeout,
        session_time=args.max_session_time,
        connections=args.max_connections,
        connections_per_ip=args.max_connections_per_ip,
        buffer_bytes=args.max_buffer,
    )
    domains = None
    if args.domains:
        domains = frozenset(d.strip().lower().rstrip(".") for d in args.domains.split(",")
                            if d.strip())
    pacing = pacing_from_options(
        args.tarpit, greeting_delay=args.greeting_delay, command_delay=args.reply_delay,
        data_delay=args.data_delay, stutter_bps=args.stutter, jitter=args.jitter,
        pregreet_wait=args.pregreet_wait,
    )
    policy = Policy(who=args.tarpit_who, max_tarpitted=args.max_tarpitted,
                    hold_cap=args.hold_cap, known_bad_sessions=args.known_bad_sessions,
                    write_budget=args.write_budget / args.workers, tcp_info=args.tcp_info)
    costs = SocketCosts(mss=args.mss, rcvbuf=args.rcvbuf, window_clamp=args.window_clamp,
                        drop_rate=args.drop_rate, for_all=args.socket_costs_for == "all")
    return Settings(
        policy=policy,
        costs=costs,
        greylist_delay=args.greylist_delay if args.greylist else None,
        smtp=[ListenAddress.parse(a) for a in (args.smtp or [":25"])],
        smtps=[ListenAddress.parse(a, 465) for a in (args.smtps or [])],
        data=args.data or default_data_dir(),
        hostname=args.hostname or socket.getfqdn(),
        persona=persona,
        limits=limits,
        pacing=pacing,
        domains=domains,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        starttls=args.starttls,
        workers=args.workers,
        worker_index=args.worker_index,
        grace=args.grace,
        backlog=args.backlog,
        argv=_without_worker_options(argv),
        record=args.record,
        retain_sessions=args.retain_sessions,
        **_api_settings(args),
    )


def _api_settings(args: argparse.Namespace) -> dict[str, object]:
    """``api`` and ``api_token`` for Settings; ValueError for an exposed API sans token."""
    from sink.api import check_exposure, read_token
    from sink.server import ListenAddress

    token = read_token(args.api_token, args.api_token_file)
    if args.api.strip().lower() in ("off", "none", ""):
        return {"api": None, "api_token": token}
    api = ListenAddress.parse(args.api, default_port=8025)
    check_exposure(api.host, api.port, token)
    return {"api": api, "api_token": token}


def _without_worker_options(argv: Sequence[str]) -> list[str]:
    """``argv`` after ``serve`` without --workers/--worker-index (the supervisor sets them)."""
    out: list[str] = []
    skip = False
    args = list(argv)
    if "serve" in args:
        args = args[args.index("serve") + 1:]
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--worker-index"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--worker-index=")):
            continue
        out.append(arg)
    return out


def _run_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from sink.server import StartupError, run
    from sink.sessionlog import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        settings = _settings(args, argv)
        return run(settings)
    except (StartupError, ValueError) as exc:
        print(f"spamsink: {exc}", file=sys.stderr)
        return 2


def _add_ips(subparsers: argparse._SubParsersAction) -> None:
    from sink.ips import add_arguments

    parser = subparsers.add_parser(
        "ips",
        help="list or export recorded senders from the store (offline)",
        description="Read the senders spamsink serve recorded in --data, also while it "
        "runs, with the API's filters; print a table or an export format.",
    )
    add_arguments(parser)




def _add_send(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "send",
        help="send test mail to an SMTP server and measure it (smtpsend-compatible)",
        description="A load generator for any SMTP server, command-line compatible with "
        "smtpsend: -n N sends exactly N messages, -t S sends for S seconds. Prints "
        "smtpsend's summary lines, then connections, failures by stage and cause, bytes "
        "and latency percentiles per stage; exits 1 when any message failed. Every long "
        "option can also be set as SPAMSINK_<OPTION>.",
        usage="spamsink send [-s senders] [-m msgs/conn] [-b bytes] (-n total | -t seconds) "
        "[-p port] [-F from] [-T to] [-S subject] [-v] [options] [host]",
    )
    parser.add_argument("host", nargs="?", default="127.0.0.1",
                        help="server to send to (default: 127.0.0.1)")
    classic = parser.add_argument_group("smtpsend options")
    amount = classic.add_mutually_exclusive_group(required=True)
    amount.add_argument("-n", dest="count", type=argtypes.positive_int, metavar="TOTAL",
                        help="send exactly TOTAL messages")
    amount.add_argument("-t", dest="duration", type=argtypes.seconds, metavar="SECONDS",
                        help="send for SECONDS (30, 5m); with --hold, how long to hold")
    classic.add_argument("-s", dest="senders", type=argtypes.positive_int, default=None,
                         metavar="SENDERS", help="concurrent senders (connections) [1]")
    classic.add_argument("-m", dest="per_connection", type=argtypes.positive_int, default=None,
                         metavar="MSGS", help="messages per connection [1]")
    classic.add_argument("-b", dest="body_bytes", type=argtypes.size, default=None, metavar="BYTES",
                         help="message body size, headers not included (as smtp-source -l) "
                         "[1024]")
    classic.add_argument("-p", dest="port", type=argtypes.port, default=25, help="server port [25]")
    classic.add_argument("-F", dest="sender", default=None, metavar="FROM",
                         help="envelope sender [smtpsend@localhost]")
    classic.add_argument("-T", dest="recipient", default=None, metavar="TO",
                         help="envelope recipient [smtpsink@localhost]")
    classic.add_argument("-S", dest="subject", default=None, metavar="SUBJECT",
                         help="Subject header [spamsink send test message]")
    classic.add_argument("-v", dest="verbose", action="count", default=0,
                         help="show the dialogue (-vv: with the message text)")

    smtp = parser.add_argument_group("SMTP")
    smtp.add_argument("--ehlo", default="localhost", metavar="NAME",
                      help="name in EHLO (HELO when the server answers EHLO with 500 or 502) "
                      "[localhost]")
    smtp.add_argument("--rcpts", type=argtypes.positive_int, default=1, metavar="N",
                      help="recipients per message: the -T address, or local+1@domain ... "
                      "local+N@domain [1]")
    smtp.add_argument("--pipelining", action="store_true",
                      help="pipeline commands (RFC 2920) when the server offers PIPELINING")
    smtp.add_argument("--bdat", action="store_true",
                      help="send messages with BDAT (RFC 3030) when the server offers CHUNKING")
    tls = smtp.add_mutually_exclusive_group()
    tls.add_argument("--starttls", action="store_true",
                     help="STARTTLS after EHLO; a server not offering it fails the message")
    tls.add_argument("--tls", action="store_true", help="implicit TLS from connect (port 465)")
    smtp.add_argument("--body", default=None, metavar="FILE|DIR",
                      help="send this message file (or every file in DIR, round-robin) as "
                      "it is, CRLF-normalised and dot-stuffed, instead of a generated one")
    smtp.add_argument("--timeout", type=argtypes.seconds, default=None, metavar="SECONDS",
                      help="seconds to wait for a connect or any reply [30; 3600 with --hold]")

    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=argtypes.positive_float, default=None, metavar="R",
                      help="start at most R messages per second in total (latency at a "
                      "given load); with -t, none whose turn comes after the run's end")
    load.add_argument("--source", default=None, metavar="ADDRS",
                      help="bind connections round-robin to these local addresses: "
                      "ADDR[,ADDR...] or a range such as 127.0.0.2-127.0.0.254")
    load.add_argument("--procs", type=argtypes.positive_int, default=1, metavar="N",
                      help="worker processes (one event loop each) to use more than one core")
    load.add_argument("--hold", type=argtypes.positive_int, default=None, metavar="N",
                      help="tarpit capacity test: open N connections and stay in the "
                      "dialogue for -t SECONDS like a patient spammer, reporting how many "
                      "are alive over time and each reply's wait")
    load.add_argument("--hold-pause", type=argtypes.seconds, default=5.0, metavar="SECONDS",
                      help="pause between messages on a held connection [5]")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object")
    output.add_argument("-q", "--quiet", action="store_true",
                        help="no progress line on the terminal")
    parser.set_defaults(handler=_run_send)


def _run_send(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from sink.send import main as send_main

    return send_main(args, argv)  # from the command line it exits at once (sink.send.main)


def _add_version(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "version", help="print the version and whether the SMTP engine is compiled",
        description="Print the version and how the SMTP engine runs: compiled (the C "
                    "extension built at install; needs gcc and python3-dev then) or "
                    "interpreted (the same source, a fifth to a third more CPU per message; "
                    "SPAMSINK_INTERPRETED=1 forces it).")
    parser.set_defaults(handler=_version)


def _version(args: argparse.Namespace, argv: list[str]) -> int:
    print(f"spamsink {__version__} (engine {engine_build()})")
    return 0


def _apply_environment(parser: argparse.ArgumentParser, command: str) -> None:
    """Let SPAMSINK_<NAME> set the default of every long option of ``parser``."""
    for action in parser._actions:
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or action.help == argparse.SUPPRESS:
            continue
        name = ENV_PREFIX + long_options[0][2:].upper().replace("-", "_")
        if name not in os.environ:
            continue
        raw = os.environ[name]
        try:
            if isinstance(action, argparse._AppendAction):
                items = [item.strip() for item in raw.split(",") if item.strip()]
                # Kept aside, not as the default: argparse appends to a default list,
                # and the command line must replace the environment, not extend it.
                parser.set_defaults(**{_ENV_LIST + action.dest: [
                    action.type(i) if action.type else i for i in items]})
                continue
            if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
                word = raw.strip().lower()
                if word not in _TRUE + _FALSE:
                    raise ValueError(f"use one of {', '.join(_TRUE + _FALSE)}")
                truthy = word in _TRUE
                value: object = (truthy if isinstance(action, argparse._StoreTrueAction)
                                 else not truthy)
            else:
                value = action.type(raw) if action.type else raw
                if action.choices is not None and value not in action.choices:
                    raise ValueError(f"choose one of {', '.join(map(str, action.choices))}")
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {name}={raw!r}: {exc}")
        action.default = value


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``spamsink`` parser with every subcommand, or only with ``command`` when that
    is one (what it parses is the same; the others' modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="spamsink",
        description="A memory hole for spam: an SMTP sink that passes for Postfix, "
        "remembers every sender and makes spam expensive.",
    )
    parser.add_argument("--version", action="version", version=f"spamsink {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {"serve": _add_serve, "send": _add_send, "ips": _add_ips,
                "version": _add_version}
    for name, add in commands.items():
        if command not in commands or command == name:
            add(subparsers)
    for name, sub in subparsers.choices.items():
        _apply_environment(sub, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spamsink`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    for key in [k for k in vars(args) if k.startswith(_ENV_LIST)]:
        env_value = getattr(args, key)
        delattr(args, key)
        dest = key[len(_ENV_LIST):]
        if not getattr(args, dest, None):
            setattr(args, dest, env_value)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return int(args.handler(args, argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
