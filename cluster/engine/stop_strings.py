"""Stop strings over streamed text: emit text as it grows, never past (or into) a stop string.

Text that could still turn out to be the start of a stop string is held back
until it is decided, so a streamed client never sees a piece of a stop string
that the final text does not contain. Each call costs the length of the new
text plus the held-back tail, not the whole text.
"""

from __future__ import annotations

from typing import NamedTuple


class StopCheck(NamedTuple):
    emit: str  # text now safe to show
    stopped: bool  # a stop string was found; ``emit`` ends right before it


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""  # the tail that may begin a stop string

    def feed(self, new_text: str, final: bool = False) -> StopCheck:
        """Add newly decoded text; ``final`` releases whatever is held back."""
        text = self._held + new_text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return StopCheck(emit=text[: min(found)], stopped=True)
        keep = 0 if final else self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return StopCheck(emit=text[: len(text) - keep], stopped=False)

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
