"""Stop strings over streamed text: the streamed pieces never show any part of a stop string."""

from __future__ import annotations

import pytest

from moeshard.cluster.engine.stop_strings import StopStringMatcher


def _stream(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopStringMatcher(stops)
    shown: list[str] = []
    for i, piece in enumerate(pieces):
        check = matcher.feed(piece, final=i == len(pieces) - 1)
        shown.append(check.emit)
        if check.stopped:
            return "".join(shown), True, shown
    return "".join(shown), False, shown


@pytest.mark.parametrize(
    "stops, pieces, expected, stopped",
    [
        ([], ["a", "b"], "ab", False),
        (["END"], ["hello E", "N", "D more"], "hello ", True),
        (["END"], ["hello E", "N", "O"], "hello ENO", False),  # a false start is released
        (["\n\n", "###"], ["line", "\n", "\n", "x"], "line", True),
        (["b", "ab"], ["xab"], "x", True),  # the stop that starts first wins
        (["stop"], ["st"], "st", False),  # the last piece releases what was held back
    ],
)
def test_stop_strings(stops, pieces, expected, stopped):
    text, was_stopped, shown = _stream(stops, pieces)
    assert text == expected and was_stopped == stopped
    for stop in stops:  # no streamed prefix ever showed a whole stop string
        assert stop not in text


def test_held_back_text_is_not_shown_early():
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.feed("answer <|").emit == "answer "
    assert matcher.feed("en").emit == ""
    assert matcher.feed("d|> tail") == ("", True)
