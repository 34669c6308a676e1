"""Stop strings: find the first stop string in generated text and cut the text before it."""

from __future__ import annotations

from typing import NamedTuple


class StopMatch(NamedTuple):
    stop: str
    text: str  # the generated text up to (not including) the stop string


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._searched = 0  # text before this index cannot start a match any more

    def search(self, text: str) -> StopMatch | None:
        """Earliest stop string in ``text`` (text only grows between calls)."""
        if not self.stops:
            return None
        start = max(0, self._searched - self._longest + 1)
        found = [(text.find(s, start), s) for s in self.stops]
        found = [(i, s) for i, s in found if i >= 0]
        self._searched = len(text)
        if not found:
            return None
        index, stop = min(found)
        return StopMatch(stop=stop, text=text[:index])

    def holdback(self, text: str) -> int:
        """How many trailing characters could still become a stop string (not to be streamed yet)."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - n :]):
                    longest = n
                    break
        return longest
