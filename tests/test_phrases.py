"""PhraseChunker: sentence/clause/time release, never a split word, lossless output."""

from __future__ import annotations

import asyncio
import re

from hypothesis import given, settings, strategies as st

from callray.agents.phrases import PhraseChunker, chunk_phrases


def tokens_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def run(tokens: list[str], step: float = 0.01, **kw) -> list[tuple[int | str, str]]:
    """Feed tokens ``step`` seconds apart; return (index of the releasing token, chunk)."""
    chunker = PhraseChunker(**kw)
    out: list[tuple[int | str, str]] = []
    for i, token in enumerate(tokens):
        out += [(i, c) for c in chunker.feed(token, i * step)]
    out += [("end", c) for c in chunker.finish()]
    return out


def test_first_sentence_released_with_its_last_word() -> None:
    tokens = tokens_of("Sure, I can help. What day works for you?")
    out = run(tokens)
    assert out[0] == (3, "Sure, I can help.")  # released by " help." itself: no wait for the next token
    assert out[1] == (len(tokens) - 1, " What day works for you?")  # "?" needs no lookahead either


def test_question_and_exclamation_released_at_once() -> None:
    chunker = PhraseChunker()
    assert chunker.feed("Hello", 0.0) == []
    assert chunker.feed(" there!", 0.01) == ["Hello there!"]


def test_abbreviations_and_decimals_do_not_end_sentences() -> None:
    text = "Dr. Smith charges 3.5 dollars, e.g. for a check. Mr. J. Doe agrees. See you at 3 p.m. today."
    chunks = [c for _, c in run(tokens_of(text))]
    assert chunks == [
        "Dr. Smith charges 3.5 dollars, e.g. for a check.",
        " Mr. J. Doe agrees.",
        " See you at 3 p.m. today.",
    ]


def test_maybe_abbreviation_ends_sentence_before_capital() -> None:
    chunks = [c for _, c in run(tokens_of("We open at 9 a.m. Tomorrow we close early."))]
    assert chunks == ["We open at 9 a.m. ", "Tomorrow we close early."]


def test_a_period_after_a_number_initial_or_abbreviation_waits_for_the_next_character() -> None:
    chunker = PhraseChunker()
    assert chunker.feed("It costs 3.", 0.0) == []  # might be 3.5
    assert chunker.feed("5 dollars.", 0.01) == ["It costs 3.5 dollars."]  # a plain word: at once
    for waiting in ("Ask Dr.", "Call J.", "Open at 9 a.m.", "Fruit, etc."):
        assert PhraseChunker().feed(waiting, 0.0) == [], waiting


def test_long_clause_released_without_sentence_end() -> None:
    text = "If you would like to come in on Tuesday afternoon, we have two openings left"
    out = run(tokens_of(text), clause_min_chars=40)
    assert out[0][1] == "If you would like to come in on Tuesday afternoon, "
    assert out[0][0] != "end"


def test_short_clause_waits() -> None:
    out = run(tokens_of("Yes, of course"), clause_min_chars=40)
    assert out == [("end", "Yes, of course")]


def test_time_flush_releases_complete_words_only() -> None:
    chunker = PhraseChunker(flush_interval_s=0.25)
    assert chunker.feed("Let me see what", 0.0) == []
    assert chunker.next_deadline() == 0.25
    assert chunker.poll(0.2) == []
    assert chunker.feed(" we hav", 0.3) == ["Let me see what we "]  # "hav" may still grow
    assert chunker.pending == "hav"
    assert chunker.feed("e two", 0.35) == []  # the rest is only 0.05 s old
    assert chunker.poll(0.5) == []
    assert chunker.poll(0.61) == ["have "]
    assert chunker.finish() == ["two"]


def test_whitespace_tail_dropped_and_nothing_pending_after_finish() -> None:
    chunker = PhraseChunker()
    assert chunker.feed("Goodbye", 0.0) == []
    assert chunker.feed("!", 0.01) == ["Goodbye!"]
    assert chunker.feed("\n\n", 0.02) == []
    assert chunker.finish() == []
    assert chunker.pending == ""
    assert chunker.next_deadline() is None


words = st.sampled_from(
    ["hello", "Dr.", "3.5", "it's", "a.m.", "ok", "well,", "yes!", "why?", "end.", "x", "e.g.", "—", "-", "…"]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(words, min_size=1, max_size=40),
    st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=50),
    st.floats(min_value=0.0, max_value=0.2),
)
def test_lossless_and_never_splits_a_word(ws: list[str], cuts: list[int], step: float) -> None:
    text = " ".join(ws)
    tokens, i = [], 0
    for cut in cuts * 50:  # arbitrary token boundaries, even inside words
        if i >= len(text):
            break
        tokens.append(text[i:i + cut])
        i += cut
    if i < len(text):
        tokens.append(text[i:])
    chunks = [c for _, c in run(tokens, step=step)]
    assert "".join(chunks) == text
    assert all(c.strip() for c in chunks)
    for left, right in zip(chunks, chunks[1:]):
        assert not (left[-1].isalnum() and right[0].isalnum()), (left, right)


async def test_chunk_phrases_first_sentence_before_stream_end() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, str]] = []
    ended: list[float] = []

    async def slow_tokens():
        for token in tokens_of("Thanks for calling. We are open today until five o'clock"):
            yield token
            await asyncio.sleep(0.02)
        ended.append(loop.time())

    async for phrase in chunk_phrases(slow_tokens(), PhraseChunker(flush_interval_s=10)):
        seen.append((loop.time(), phrase))
    assert [p for _, p in seen] == ["Thanks for calling.", " We are open today until five o'clock"]
    assert seen[0][0] < ended[0]


async def test_chunk_phrases_flushes_on_time_while_source_stalls() -> None:
    released = asyncio.Event()

    async def stalling():
        yield "Let me check"
        yield " that"
        await released.wait()  # the source stalls mid-sentence
        yield " now."

    out: list[str] = []
    async for phrase in chunk_phrases(stalling(), PhraseChunker(flush_interval_s=0.05)):
        out.append(phrase)
        released.set()
    assert out == ["Let me check ", "that now."]  # complete words flushed on time; then the sentence at once


async def test_chunk_phrases_reraises_and_closes_source() -> None:
    closed = asyncio.Event()

    async def failing():
        try:
            yield "Hello there."
            yield " Next"
            raise ConnectionError("upstream broke")
        finally:
            closed.set()

    out: list[str] = []
    try:
        async for phrase in chunk_phrases(failing()):
            out.append(phrase)
    except ConnectionError as exc:
        assert "upstream broke" in str(exc)
    else:
        raise AssertionError("the source's error was swallowed")
    assert out == ["Hello there."]
    assert closed.is_set()


async def test_closing_chunk_phrases_cancels_the_source_at_once() -> None:
    cancelled = asyncio.Event()

    async def endless():
        try:
            yield "First sentence. "
            await asyncio.sleep(3600)
            yield "never"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    gen = chunk_phrases(endless())
    assert await gen.__anext__() == "First sentence. "
    await gen.aclose()
    assert cancelled.is_set()
