"""Streaming tool calls: from a choice's cumulative text to ``delta.content`` and ``delta.tool_calls``."""

from __future__ import annotations

from deltaserve.server.tool_parsers.base import MalformedToolCall, ToolParser


class ToolCallStream:
    """One choice's stream state.

    Content is sent as it grows, except a tail that could still become the start marker; from the
    marker on, each call is sent whole (name and arguments in one ``delta.tool_calls`` entry) once
    its block is complete. If the first block is malformed, or the output ends without a call, the
    held-back text is sent as content, as the non-streamed answer would have it. A malformed block
    after calls were sent is dropped.
    """

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.sent_chars = 0
        self.num_calls = 0
        self._marker_at: int | None = None
        self._plain = False

    def update(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """``(new content, new tool_calls entries)`` for the cumulative ``text``."""
        marker = self.parser.start_marker
        if not self._plain and self._marker_at is None:
            at = text.find(marker, max(0, self.sent_chars - len(marker)))
            if at == -1:
                return self._content(text, len(text) if final else len(text) - _partial_suffix(text, marker)), []
            self._marker_at = at
        if self._plain:
            return self._content(text, len(text)), []
        content = self._content(text, self._marker_at)
        try:
            calls = self.parser.parse_calls(text[self._marker_at:], final)
        except MalformedToolCall:
            calls = None
        if self.num_calls == 0 and (calls is None or (final and not calls)):
            self._plain = True
            return content + self._content(text, len(text)), []
        new = (calls or [])[self.num_calls:]
        entries = [call.as_dict(index=self.num_calls + i) for i, call in enumerate(new)]
        self.num_calls += len(new)
        return content, entries

    def _content(self, text: str, end: int) -> str:
        new = text[self.sent_chars:end]
        self.sent_chars = max(self.sent_chars, end)
        return new


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
