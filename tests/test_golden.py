"""Golden dialogues against a live ``spamsink serve``, one sink per option set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import transcript as tr
from tests.support import SinkProcess

CASES = [(persona, t) for persona in ("postfix", "exim") for t in tr.all_transcripts(persona)]


@pytest.fixture(scope="module")
def sinks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], SinkProcess]]:
    """Sinks started on demand, one per (persona, options), shared by the module."""
    started: dict[tuple[str, ...], SinkProcess] = {}
    yield started
    for process in started.values():
        process.stop()


def _sink_for(sinks: dict, tmp: Path, persona: str, args: list[str]) -> SinkProcess:
    key = (persona, *args)
    if key not in sinks:
        sinks[key] = SinkProcess(tmp / f"data{len(sinks)}", ["--persona", persona, *args]).start()
    return sinks[key]


@pytest.mark.parametrize(("persona", "transcript"), CASES, ids=[t.name for _, t in CASES])
def test_transcript(persona: str, transcript: tr.Transcript, sinks: dict,
                    tmp_path_factory: pytest.TempPathFactory) -> None:
    sink = _sink_for(sinks, tmp_path_factory.getbasetemp(), persona, transcript.sink_args)
    assert tr.play(transcript, sink.host, sink.port) == tr.expected(transcript)
