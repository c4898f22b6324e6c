"""The sink and a real Debian Postfix answer every golden dialogue identically.

Queue ids aside, every reply line of every ``tests/golden/postfix`` transcript must be
the same from both servers, and both must match the transcript. One Postfix and one
sink run per distinct option set.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import transcript as tr
from tests.postfix_peer import RealPostfix
from tests.support import SinkProcess, free_port, need_root, need_tool

TRANSCRIPTS = tr.all_transcripts("postfix")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """(postfix, sink) pairs started on demand, keyed by the transcript's options."""
    need_root()
    need_tool("postfix")
    need_tool("openssl")
    started: dict[tuple, tuple[RealPostfix, SinkProcess]] = {}
    yield started
    for postfix, sink in started.values():
        sink.stop()
        postfix.stop()


def _pair(servers: dict, transcript: tr.Transcript,
          factory: pytest.TempPathFactory) -> tuple[RealPostfix, SinkProcess]:
    key = (tuple(sorted(transcript.postfix.items())), tuple(transcript.sink_args))
    if key not in servers:
        postfix = RealPostfix(free_port(), transcript.postfix,
                              accept_all="relay_domains" not in transcript.postfix).start()
        sink = SinkProcess(factory.mktemp("sink"), ["--persona", "postfix", *transcript.sink_args])
        servers[key] = (postfix, sink.start())
    return servers[key]


@pytest.mark.slow
@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.name for t in TRANSCRIPTS])
def test_same_replies_as_postfix(transcript: tr.Transcript, servers: dict,
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    postfix, sink = _pair(servers, transcript, tmp_path_factory)
    from_postfix = tr.play(transcript, "127.0.0.1", postfix.port)
    from_sink = tr.play(transcript, sink.host, sink.port)
    assert from_sink == from_postfix
    assert from_postfix == tr.expected(transcript)
