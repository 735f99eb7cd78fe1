"""Coalesce streamed LLM tokens into phrase-sized chunks.

Retell starts speaking at the first complete sentence, and every chunk is one WebSocket frame
through the Serve proxy, so a token-per-frame stream is both slow to matter and expensive.
The chunker releases a sentence the moment it is known to be complete, a long clause at a
comma or dash, and otherwise whatever complete words have waited longer than a flush
interval. It never splits a word and is lossless: the chunks concatenate to the input (only a
whitespace-only tail is dropped), because Retell concatenates chunks for TTS and transcript.

``PhraseChunker`` is pure logic with explicit times (testable without sleeping);
``chunk_phrases`` drives it over an async iterator of tokens with a real clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterable, AsyncIterator, Callable

_SENTENCE_END = ".!?"
_CLOSERS = "\"')]}\u201d\u2019\u00bb"
_CLAUSE_END = ",;:"
_DASHES = "\u2014\u2013"
# Never a sentence end: the next word belongs to the same sentence ("Dr. Smith").
_ABBREV_ALWAYS = frozenset(
    "dr mr mrs ms mx prof sr jr st vs mt ft approx dept e.g i.e cf".split()
)
# A sentence end only if the next word starts with a capital ("at 3 p.m. Then", "3 p.m. today").
_ABBREV_MAYBE = frozenset("a.m p.m etc inc ltd co corp".split())


class PhraseChunker:
    """Incremental phrase segmentation; feed tokens with the time they arrived.

    Release rules, checked after every token and on ``poll``:
    1. each complete sentence (terminal punctuation followed by whitespace; at the end of the
       buffer ``!``/``?``, and a ``.`` after a plain word that is no abbreviation, so the first
       sentence never waits for the next token) is released as its own chunk;
    2. otherwise, if the text up to the last clause boundary (``, ; :``, a dash, an ellipsis)
       is at least ``clause_min_chars`` long, it is released;
    3. otherwise, once the oldest buffered text is ``flush_interval_s`` old, all complete
       words (up to the last whitespace) are released.
    """

    def __init__(self, *, flush_interval_s: float = 0.25, clause_min_chars: int = 40) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}")
        self.flush_interval_s = flush_interval_s
        self.clause_min_chars = clause_min_chars
        self._buf = ""
        self._since: float | None = None  # arrival time of the oldest unreleased text
        self._last_feed = 0.0

    @property
    def pending(self) -> str:
        """Text received but not released yet."""
        return self._buf

    def feed(self, text: str, now: float) -> list[str]:
        """Add a token that arrived at ``now``; return the chunks it completes."""
        if text:
            if self._since is None:
                self._since = now
            self._buf += text
            self._last_feed = now
        return self._release(now)

    def poll(self, now: float) -> list[str]:
        """Release what the flush interval allows at ``now`` (call at ``next_deadline()``)."""
        return self._release(now)

    def next_deadline(self) -> float | None:
        """When buffered text becomes due for a time flush (None if nothing is waiting)."""
        if self._since is None or not self._buf.strip():
            return None
        return self._since + self.flush_interval_s

    def finish(self) -> list[str]:
        """The stream ended: release everything left (a whitespace-only tail is dropped)."""
        chunks = self._drain_sentences()
        rest, self._buf, self._since = self._buf, "", None
        if rest.strip():
            chunks.append(rest)
        return chunks

    # ------------------------------------------------------------------ internals

    def _release(self, now: float) -> list[str]:
        chunks = self._drain_sentences()
        if not self._buf.strip():
            return chunks
        cut = _last_clause_end(self._buf)
        if cut is not None and len(self._buf[:cut].strip()) >= self.clause_min_chars:
            chunks.append(self._take(cut))
        elif self._since is not None and now - self._since >= self.flush_interval_s:
            cut = _last_word_end(self._buf)
            if cut is not None:
                chunks.append(self._take(cut))
        return chunks

    def _drain_sentences(self) -> list[str]:
        chunks = []
        while (cut := _first_sentence_end(self._buf)) is not None:
            chunks.append(self._take(cut))
        return chunks

    def _take(self, cut: int) -> str:
        """Remove and return ``buf[:cut]``; the rest keeps the time of the latest token."""
        head, rest = self._buf[:cut], self._buf[cut:]
        self._buf = rest
        self._since = self._last_feed if rest.strip() else None
        return head


def _skip_spaces(buf: str, j: int) -> int:
    while j < len(buf) and buf[j].isspace():
        j += 1
    return j


def _word_before(buf: str, i: int) -> str:
    """The word ending just before index ``i`` (lower-cased, without opening punctuation)."""
    start = i
    while start > 0 and not buf[start - 1].isspace():
        start -= 1
    return buf[start:i].lstrip("\"'([{\u201c\u2018\u00ab").lower()


def _first_sentence_end(buf: str) -> int | None:
    """Index just past the first complete sentence and its trailing whitespace, else None."""
    i = 0
    n = len(buf)
    while i < n:
        ch = buf[i]
        if ch not in _SENTENCE_END and ch != "\u2026":
            i += 1
            continue
        j = i + 1
        while j < n and (buf[j] in _SENTENCE_END or buf[j] in _CLOSERS):
            j += 1
        if ch == "\u2026" or buf[i:j].startswith(".."):  # an ellipsis is a pause, not an end
            i = j
            continue
        if j == n:
            # "!" and "?" are unambiguous without seeing what follows; "." is after a plain word
            # ("dollars."), not after a number ("3." may be 3.5), an initial or an abbreviation.
            final = buf[i:j].rstrip(_CLOSERS)[-1] in "!?" or _plain_word_before(buf, i)
            return j if final and buf[:i].strip() else None
        if not buf[j].isspace():  # "3.5", "e.g", "example.com", "?!x"
            i = j
            continue
        k = _skip_spaces(buf, j)
        if ch == "." and not _period_ends_sentence(buf, i, k):
            if k == n and _needs_next_word(buf, i):
                return None  # undecidable until the next word arrives
            i = k
            continue
        return k
    return None


def _period_ends_sentence(buf: str, i: int, next_start: int) -> bool:
    word = _word_before(buf, i)
    if not word:
        return False
    if word in _ABBREV_ALWAYS:
        return False
    if len(word) == 1 and word.isalpha():  # an initial: "J. Smith"
        return False
    if word in _ABBREV_MAYBE:
        return next_start < len(buf) and buf[next_start].isupper()
    return True


def _plain_word_before(buf: str, i: int) -> bool:
    word = _word_before(buf, i)
    return len(word) > 1 and word.isalpha() and word not in _ABBREV_ALWAYS and word not in _ABBREV_MAYBE


def _needs_next_word(buf: str, i: int) -> bool:
    return _word_before(buf, i) in _ABBREV_MAYBE


def _last_clause_end(buf: str) -> int | None:
    """Index just past the last clause boundary (and its whitespace) in ``buf``, else None."""
    best = None
    n = len(buf)
    for i, ch in enumerate(buf):
        j = i + 1
        if ch in _CLAUSE_END or ch == "\u2026" or (ch == "." and buf[i:i + 3] == "..."):
            if ch == ".":
                j = i + 3
            if j < n and buf[j].isspace():
                best = _skip_spaces(buf, j)
        elif ch in _DASHES or (ch == "-" and 0 < i and buf[i - 1] == " " and j < n and buf[j] == " "):
            if j < n and buf[j].isspace():
                best = _skip_spaces(buf, j)
    return best


def _last_word_end(buf: str) -> int | None:
    """Index just past the last whitespace run that follows some text, else None."""
    end = len(buf)
    while end > 0 and not buf[end - 1].isspace():
        end -= 1
    if end == 0 or not buf[:end].strip():
        return None
    return end


# --------------------------------------------------------------------------- async driver


class _End:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def _pump(tokens: AsyncIterable[str], queue: asyncio.Queue) -> None:
    try:
        async for token in tokens:
            if token:
                queue.put_nowait(token)
    except Exception as exc:  # handed to the consumer, which re-raises it
        queue.put_nowait(_Failed(exc))
        return
    queue.put_nowait(_End())


async def chunk_phrases(
    tokens: AsyncIterable[str],
    chunker: PhraseChunker | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[str]:
    """Yield phrases from an async iterator of tokens, flushing on time as well as on text.

    The source is iterated in a dedicated task, so a flush timer never cancels a read in
    progress, and a source may use ``asyncio.timeout`` across its yields. Closing this
    generator (or cancelling the task iterating it) cancels that task at once, which closes
    the source (e.g. an HTTP stream). An exception raised by the source is re-raised here.
    """
    chunker = chunker or PhraseChunker()
    queue: asyncio.Queue = asyncio.Queue()
    reader = asyncio.ensure_future(_pump(tokens, queue))
    try:
        while True:
            deadline = chunker.next_deadline()
            if deadline is None:
                item = await queue.get()
            else:
                try:
                    async with asyncio.timeout(max(0.0, deadline - clock())):
                        item = await queue.get()
                except TimeoutError:
                    for phrase in chunker.poll(clock()):
                        yield phrase
                    continue
            if isinstance(item, _End):
                break
            if isinstance(item, _Failed):
                raise item.error
            for phrase in chunker.feed(item, clock()):
                yield phrase
        for phrase in chunker.finish():
            yield phrase
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait({reader})
