"""Per-browser-session chat state: the turns, their token provenance and the engine Session.

The chat history shown in the browser is *rendered* from this state (with or without highlighting);
the engine always sees the plain text, so highlighting never leaks into the next prompt.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from ppd_core.engine import Chunk, Session


@dataclass
class TokenPieces:
    """Splits a reply into per-token text pieces with their provenance, for highlighting.

    A piece is the text a token adds to the decoded prefix; a token that ends inside a multi-byte
    character is held back and merged with the next one (the merged piece counts as a guess only
    if all its tokens were guesses).
    """
    ids: list[int] = field(default_factory=list)
    pieces: list[tuple[str, str]] = field(default_factory=list)  # (text, "model" | "ppd")
    decoded: str = ""
    pending: list[str] = field(default_factory=list)  # provenance of held-back tokens

    def add(self, tokenizer, token_ids: list[int], provenance: list[str]) -> None:
        for tok, prov in zip(token_ids, provenance, strict=True):
            self.ids.append(tok)
            self.pending.append(prov)
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # unfinished character: wait for the next token
            kind = "ppd" if all(p != "model" for p in self.pending) else "model"  # any accepted guess
            self.pieces.append((text[len(self.decoded):], kind))
            self.decoded, self.pending = text, []


@dataclass
class Turn:
    user: str
    reply: str = ""  # exactly the engine's text (concatenated chunk deltas)
    tokens: TokenPieces = field(default_factory=TokenPieces)
    finish_reason: str | None = None

    def add_chunk(self, tokenizer, chunk: Chunk) -> None:
        self.reply += chunk.text
        self.tokens.add(tokenizer, chunk.token_ids, chunk.provenance)
        self.finish_reason = chunk.finish_reason


@dataclass
class Conversation:
    """One chat. The engine Session keeps the KV cache of the last prompt + reply, so the next turn
    only prefills what is new; Regenerate and history changes are handled by the engine's
    common-prefix reuse, Clear resets the session."""
    turns: list[Turn] = field(default_factory=list)
    session: Session = field(default_factory=Session)

    def messages(self, system_prompt: str) -> list[dict]:
        """The prompt for the last turn: system prompt, earlier turns, the last user message."""
        out = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
        for i, turn in enumerate(self.turns):
            out.append({"role": "user", "content": turn.user})
            if i < len(self.turns) - 1:
                out.append({"role": "assistant", "content": turn.reply})
        return out

    def clear(self) -> None:
        self.turns = []
        self.session.reset()


def render_reply(turn: Turn, highlight: bool) -> str:
    """The assistant message as shown: plain text, or HTML with accepted guesses in <mark>."""
    if not highlight:
        return turn.reply
    parts = []
    for text, kind in turn.tokens.pieces:
        escaped = html.escape(text)
        if kind == "ppd":
            # wrap each line separately so a guessed newline never splits a tag across markdown blocks
            escaped = "\n".join(f'<mark class="ppd-guess">{line}</mark>' if line else ""
                                for line in escaped.split("\n"))
        parts.append(escaped)
    return "".join(parts)


def render_history(conv: Conversation, highlight: bool) -> list[dict]:
    """Gradio 6 Chatbot value: a list of {"role", "content"} messages."""
    out: list[dict] = []
    for turn in conv.turns:
        out.append({"role": "user", "content": turn.user})
        if turn.reply or turn.tokens.pieces:
            out.append({"role": "assistant", "content": render_reply(turn, highlight)})
    return out
