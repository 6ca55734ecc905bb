"""Event handlers of the UI. Every one that decodes goes through `engine.generate` and is a generator,
so Gradio streams its yields and, on Stop or a client disconnect, closes it (which closes the engine's
generator and frees the engine for the next request)."""

from __future__ import annotations

import html
from collections.abc import Iterator

import gradio as gr

from ppd_core.engine import Chunk, Engine, InputError, Settings

from .conversation import Conversation, Turn, render_history, render_reply
from .figures import MemoryPeaks, comparison, comparison_markdown, figures, figures_markdown

GREEDY = "Deterministic (greedy)"
# the sampling preset: PPD verifies by lossless speculative sampling, so the distribution is that of PPD off
PRESETS: dict[str, dict] = {GREEDY: {}, "Sampling (temperature 0.7, top-p 0.9)": {"temperature": 0.7, "top_p": 0.9}}


def decoding_settings(max_new_tokens: float, repetition_penalty: float, ppd: bool, decoding: str = GREEDY,
                      seed: float | None = None) -> Settings:
    """UI values -> engine Settings. A seed < 0 (or none) draws a fresh one per reply."""
    if decoding not in PRESETS:
        raise InputError(f"unknown decoding preset {decoding!r}")
    # "PPD on" = every guess source in one tree (prompt tokens + context n-grams); off = plain decoding
    return Settings(max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty), ppd=bool(ppd),
                    ngram=bool(ppd), seed=int(seed) if seed is not None and seed >= 0 else None, **PRESETS[decoding])


def panel_html(turn: Turn, highlight: bool) -> str:
    body = render_reply(turn, highlight) if highlight else html.escape(turn.reply)
    return f'<div class="ppd-panel" style="white-space: pre-wrap">{body}</div>'


class ChatHandlers:
    """The app's callbacks, bound to one engine (passed in; no module-level state)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def _outputs(self, conv: Conversation, highlight: bool, counters, ppd: bool, peaks: MemoryPeaks,
                 status: str, message: str = "") -> tuple:
        f = figures(self.engine, counters, ppd, peaks)
        return message, render_history(conv, highlight), figures_markdown(f, status), f, conv, peaks

    def _stream_reply(self, conv: Conversation, system_prompt: str, settings: Settings, highlight: bool,
                      peaks: MemoryPeaks) -> Iterator[tuple]:
        """Generate the reply of the last turn, yielding the chat outputs after every chunk."""
        turn = conv.turns[-1]
        turn.reply, turn.finish_reason = "", None
        turn.tokens = type(turn.tokens)()
        yield self._outputs(conv, highlight, None, settings.ppd, peaks, "_preparing the prompt…_")
        chunks = self.engine.generate(conv.messages(system_prompt), settings, conv.session)
        last: Chunk | None = None
        try:
            for chunk in chunks:
                last = chunk
                turn.add_chunk(self.engine.tokenizer, chunk)
                status = "_generating…_" if chunk.finish_reason is None else f"done ({chunk.finish_reason})"
                if chunk.finish_reason is not None:
                    peaks.record(settings.ppd, chunk.counters)
                yield self._outputs(conv, highlight, chunk.counters, settings.ppd, peaks, status)
        except InputError as exc:
            conv.turns.pop()  # the turn never ran: give the message back to the text box
            yield self._outputs(conv, highlight, None, settings.ppd, peaks, "", message=turn.user)
            raise gr.Error(str(exc)) from exc
        finally:
            chunks.close()  # on Stop/disconnect Gradio closes us; this stops the engine at once
            if last is not None and last.finish_reason is None:
                turn.finish_reason = "stopped"

    def send(self, message: str, system_prompt: str, max_new_tokens: float, repetition_penalty: float,
             ppd: bool, highlight: bool, decoding: str, seed: float | None, conv: Conversation,
             peaks: MemoryPeaks) -> Iterator[tuple]:
        """Send a chat message and stream the reply."""
        if not message or not message.strip():
            gr.Warning("Type a message first.")
            yield self._outputs(conv, highlight, None, ppd, peaks, "")
            return
        try:
            settings = decoding_settings(max_new_tokens, repetition_penalty, ppd, decoding, seed)
            settings.validate()
        except InputError as exc:
            raise gr.Error(str(exc)) from exc
        conv.turns.append(Turn(user=message))
        yield from self._stream_reply(conv, system_prompt, settings, highlight, peaks)

    def regenerate(self, system_prompt: str, max_new_tokens: float, repetition_penalty: float, ppd: bool,
                   highlight: bool, decoding: str, seed: float | None, conv: Conversation,
                   peaks: MemoryPeaks) -> Iterator[tuple]:
        """Answer the last message again (with the current settings); the cache keeps the shared prefix."""
        if not conv.turns:
            gr.Warning("Nothing to regenerate yet.")
            yield self._outputs(conv, highlight, None, ppd, peaks, "")
            return
        try:
            settings = decoding_settings(max_new_tokens, repetition_penalty, ppd, decoding, seed)
        except InputError as exc:
            raise gr.Error(str(exc)) from exc
        yield from self._stream_reply(conv, system_prompt, settings, highlight, peaks)

    def clear(self, ppd: bool, conv: Conversation, peaks: MemoryPeaks) -> tuple:
        """Start a new conversation (drops the KV cache)."""
        conv.clear()
        return self._outputs(conv, True, None, ppd, peaks, "")

    def rerender(self, highlight: bool, conv: Conversation) -> list[dict]:
        """Highlighting switched: the same history, rendered again."""
        return render_history(conv, highlight)

    def side_by_side(self, prompt: str, system_prompt: str, max_new_tokens: float, repetition_penalty: float,
                     highlight: bool, decoding: str, seed: float | None, peaks: MemoryPeaks) -> Iterator[tuple]:
        """Plain and PPD on the same prompt, stepped alternately (one chunk each in turn).

        On a 2-core CPU two generations running at once would fight over the cores unevenly; taking
        turns keeps each one's timing clean (the engine times only its own steps), and both still stream.
        """
        if not prompt or not prompt.strip():
            gr.Warning("Type a prompt first.")
            return
        conv = Conversation(turns=[Turn(user=prompt)])
        messages = conv.messages(system_prompt)
        turns = {"plain": Turn(user=prompt), "ppd": Turn(user=prompt)}
        counters: dict = {"plain": None, "ppd": None}
        try:
            both = {mode: decoding_settings(max_new_tokens, repetition_penalty, mode == "ppd", decoding, seed)
                    for mode in ("plain", "ppd")}
            gens = {mode: self.engine.generate(messages, settings) for mode, settings in both.items()}
        except InputError as exc:  # generate() validates lazily; this only catches bad settings
            raise gr.Error(str(exc)) from exc
        done = {"plain": False, "ppd": False}

        def outputs(status: str) -> tuple:
            # sampled replies differ by design (same distribution, other draws): nothing to compare
            finished = all(done.values()) and not both["ppd"].sampling
            identical = turns["plain"].reply == turns["ppd"].reply if finished else None
            cmp = comparison(figures(self.engine, counters["plain"], False, peaks),
                             figures(self.engine, counters["ppd"], True, peaks), identical)
            return (panel_html(turns["plain"], False), panel_html(turns["ppd"], highlight),
                    comparison_markdown(cmp, status), cmp, peaks)

        try:
            while not all(done.values()):
                for mode in ("plain", "ppd"):
                    if done[mode]:
                        continue
                    try:
                        chunk = next(gens[mode], None)
                    except InputError as exc:
                        raise gr.Error(str(exc)) from exc
                    if chunk is None:
                        done[mode] = True
                        continue
                    turns[mode].add_chunk(self.engine.tokenizer, chunk)
                    counters[mode] = chunk.counters
                    if chunk.finish_reason is not None:
                        done[mode] = True
                        peaks.record(mode == "ppd", chunk.counters)
                    yield outputs("_running both, one step each in turn…_" if not all(done.values()) else "done")
        finally:
            for gen in gens.values():
                gen.close()
