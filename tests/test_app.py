"""The chat app, driven through gradio_client against a launched server (slow ones use the real model)."""

from __future__ import annotations

import argparse
import socket
import time

import pytest

from app.chat import add_chat_args, launch_ui, parse_auth, share_auth
from app.conversation import Conversation, TokenPieces, Turn, render_reply
from app.figures import MemoryPeaks, comparison
from app.handlers import PRESETS
from ppd_core.engine import Counters, Settings

MAX_NEW = 24
REP = 1.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_reply(engine, messages: list[dict], max_new: int = MAX_NEW, ppd: bool = True) -> str:
    settings = Settings(max_new_tokens=max_new, repetition_penalty=REP, ppd=ppd)
    return "".join(chunk.text for chunk in engine.generate(messages, settings))


def message_text(message: dict) -> str:
    """Chatbot message content as gradio_client returns it (a list of text parts in Gradio 6)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def history_messages(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": message_text(m)} for m in history]


def chat(client, text: str, max_new: int = MAX_NEW, ppd: bool = True, system: str = "") -> list[tuple]:
    """All streamed outputs of one /chat call (highlighting off, so the history holds the plain reply)."""
    job = client.submit(text, system, max_new, REP, ppd, False, api_name="/chat")
    outs = list(job)
    if job.exception() is not None:  # iterating a job never raises; an app error lands here
        raise job.exception()
    return outs


# ---------------------------------------------------------------- fast: no model, no server


def test_chat_flags_are_documented():
    p = argparse.ArgumentParser()
    add_chat_args(p)
    helptext = p.format_help()
    for flag in ("--host", "--port", "--share", "--auth", "--no-ppd", "--max-new-tokens", "--recalibrate"):
        assert flag in helptext
    args = p.parse_args([])
    assert (args.host, args.port, args.share, args.auth, args.no_ppd, args.max_new_tokens) == (
        "127.0.0.1", 7860, False, None, False, 256)


def test_auth_parsing_and_generated_share_credentials(capsys):
    assert parse_auth("ann:secret:x") == ("ann", "secret:x")
    with pytest.raises(SystemExit):
        parse_auth("nopassword")
    assert share_auth(False, None) is None
    assert share_auth(True, ("a", "b")) == ("a", "b")
    user, password = share_auth(True, None)
    out = capsys.readouterr().out
    assert user in out and password in out and len(password) >= 8


class ByteTokenizer:
    """Token id = one byte; decode like a byte-level BPE (incomplete UTF-8 -> U+FFFD)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_highlighting_follows_provenance_and_escapes_html():
    turn = Turn(user="hi")
    tok = ByteTokenizer()
    pieces = TokenPieces()
    text = "a<b é\nc"
    ids = list(text.encode())
    prov = ["model", "ppd", "model", "ppd", "ppd", "ppd", "ppd", "model"]
    assert len(ids) == len(prov)
    pieces.add(tok, ids, prov)
    turn.tokens, turn.reply = pieces, text
    html_text = render_reply(turn, highlight=True)
    assert html_text == 'a<mark class="ppd-guess">&lt;</mark>b<mark class="ppd-guess"> </mark>' \
        '<mark class="ppd-guess">é</mark>\nc'
    assert render_reply(turn, highlight=False) == text


def test_conversation_messages_and_clear():
    conv = Conversation(turns=[Turn(user="one", reply="first"), Turn(user="two")])
    assert conv.messages("  ") == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first"},
                                   {"role": "user", "content": "two"}]
    assert conv.messages("be brief")[0] == {"role": "system", "content": "be brief"}
    conv.session.cached_ids = [1, 2]
    conv.clear()
    assert conv.turns == [] and conv.session.cached_ids == []


def test_runtime_memory_overhead_needs_both_modes():
    peaks = MemoryPeaks()
    peaks.record(True, Counters(peak_memory_mb=110.0))
    assert peaks.runtime_overhead is None
    peaks.record(False, Counters(peak_memory_mb=100.0))
    assert peaks.runtime_overhead == pytest.approx(0.1)
    plain, ppd = {"tokens_per_s": 10.0}, {"tokens_per_s": 15.0}
    assert comparison(plain, ppd, True)["speedup"] == 1.5


# ---------------------------------------------------------------- slow: the real model behind a launched app


@pytest.fixture(scope="module")
def app_url(engine):
    from app.ui import build_ui

    demo = build_ui(engine)
    launch_ui(demo, "127.0.0.1", free_port(), share=False, auth=None, block=False)
    yield demo.local_url
    demo.close()


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.mark.slow
def test_chat_reply_equals_engine_output_and_figures_stream(engine, client):
    outs = chat(client, "Name three colours of the rainbow.")
    history, figures = outs[-1][1], outs[-1][3]
    assert history[-1]["role"] == "assistant"
    want = expected_reply(engine, [{"role": "user", "content": "Name three colours of the rainbow."}])
    assert message_text(history[-1]) == want
    assert figures["ppd"] is True and 0 < figures["new_tokens"] <= MAX_NEW
    assert figures["forward_passes"] >= 1 and figures["tokens_per_s"] > 0
    # figures change while the reply streams: several distinct intermediate figures
    seen = {(o[3]["new_tokens"], o[3]["forward_passes"]) for o in outs[:-1] if o[3]["forward_passes"]}
    assert len(seen) > 1
    assert "tokens/s" in outs[-1][2] and "acceptance length" in outs[-1][2]


@pytest.mark.slow
def test_second_turn_reuses_the_cache_and_matches_engine(engine, client):
    chat(client, "Say hello.")
    outs = chat(client, "Now say goodbye.")
    history, figures = outs[-1][1], outs[-1][3]
    msgs = history_messages(history)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[-1]["content"] == expected_reply(engine, msgs[:-1])
    assert 0 < figures["prefill_tokens"] < figures["prompt_tokens"] - 5  # the first turn came from the cache


@pytest.mark.slow
def test_ppd_off_gives_identical_text_and_acceptance_length_one(client):
    prompt = "Write one sentence about the sea."
    on = chat(client, prompt, ppd=True)[-1]
    client.predict(True, api_name="/clear")
    off = chat(client, prompt, ppd=False)[-1]
    assert message_text(off[1][-1]) == message_text(on[1][-1])
    assert off[3]["ppd"] is False and off[3]["tau"] == 1.0
    # both modes measured now, so the runtime memory overhead is a number
    assert off[3]["runtime_memory_overhead"] is not None


@pytest.mark.slow
def test_sampling_preset_with_a_seed_is_reproducible(client):
    sampling = next(name for name, preset in PRESETS.items() if preset)
    replies = []
    for ppd, seed in ((True, 11), (True, 11), (True, 12)):
        client.predict(True, api_name="/clear")
        job = client.submit("Name three colours.", "", 24, REP, ppd, False, sampling, seed, api_name="/chat")
        last = list(job)[-1]
        assert job.exception() is None
        assert last[3]["ppd"] is True and last[3]["new_tokens"] > 0
        replies.append(message_text(last[1][-1]))
    assert replies[0] == replies[1]  # same seed, same reply
    assert replies[0] != replies[2]  # the preset really samples


@pytest.mark.slow
def test_regenerate_and_clear(engine, client):
    first = chat(client, "What is the capital of Italy?")[-1]
    again = list(client.submit("", MAX_NEW, REP, True, False, api_name="/regenerate"))[-1]
    assert len(again[1]) == 2 and message_text(again[1][-1]) == message_text(first[1][-1])
    assert again[3]["prefill_tokens"] <= 1  # same prompt: everything but the last token came from the cache
    cleared = client.predict(True, api_name="/clear")
    assert cleared[1] == []


@pytest.mark.slow
def test_side_by_side_reports_identity_and_speedup(client):
    outs = list(client.submit("List two fruits.", "", MAX_NEW, REP, True, api_name="/side_by_side"))
    assert len(outs) > 2  # both panels streamed
    result = outs[-1][3]
    assert result["identical"] is True
    assert isinstance(result["speedup"], float) and result["speedup"] > 0
    assert result["plain"]["tau"] == 1.0 and result["ppd"]["forward_passes"] <= result["plain"]["forward_passes"]
    assert "speed-up" in outs[-1][2]


@pytest.mark.slow
def test_two_concurrent_clients_get_their_own_answers(engine, app_url):
    from gradio_client import Client

    prompts = ["What is two plus two?", "Name a big city in Japan."]
    clients = [Client(app_url, verbose=False) for _ in prompts]
    jobs = [c.submit(p, "", MAX_NEW, REP, True, False, api_name="/chat") for c, p in zip(clients, prompts, strict=True)]
    results = [list(job)[-1] for job in jobs]
    for prompt, result in zip(prompts, results, strict=True):
        msgs = history_messages(result[1])
        assert [m["content"] for m in msgs if m["role"] == "user"] == [prompt]  # no mixing
        assert msgs[-1]["content"] == expected_reply(engine, [{"role": "user", "content": prompt}])


@pytest.mark.slow
def test_stop_frees_the_engine_and_the_next_request_works(engine, app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    job = client.submit("Tell me a long story about a dragon.", "", 400, REP, True, False, api_name="/chat")
    deadline = time.time() + 120
    while time.time() < deadline and not any(o[3]["new_tokens"] for o in job.outputs()):
        time.sleep(0.2)
    job.cancel()
    started = time.time()
    other = Client(app_url, verbose=False)  # another user is served right away, not after 400 tokens
    result = chat(other, "Say yes.", max_new=8)[-1]
    assert message_text(result[1][-1]) == expected_reply(engine, [{"role": "user", "content": "Say yes."}], 8)
    # the stopped conversation goes on: its next turn sees the partial reply and answers like the engine
    follow = chat(client, "Thanks.", max_new=8)[-1]
    msgs = history_messages(follow[1])
    assert msgs[0]["content"] == "Tell me a long story about a dragon." and len(msgs) == 4
    assert msgs[-1]["content"] == expected_reply(engine, msgs[:-1], 8)
    assert time.time() - started < 600


@pytest.mark.slow
def test_bad_input_gives_a_clear_message_and_the_server_keeps_serving(engine, client):
    from gradio_client.exceptions import AppError

    empty = chat(client, "   ")[-1]
    assert empty[1] == []  # a warning, nothing sent
    with pytest.raises(AppError, match="context holds"):
        chat(client, "hello " * 9000)
    result = chat(client, "Say yes.", max_new=8)[-1]
    assert len(result[1]) == 2  # the rejected turn is gone from the history
    assert message_text(result[1][-1]) == expected_reply(engine, [{"role": "user", "content": "Say yes."}], 8)


@pytest.mark.slow
def test_share_without_network_says_so_and_keeps_serving_locally(engine, monkeypatch, capsys):
    import gradio.networking
    from gradio_client import Client

    from app.ui import build_ui

    # no internet here anyway; point the share server at a closed local port so this holds everywhere
    monkeypatch.setattr(gradio.networking, "GRADIO_API_SERVER", "http://127.0.0.1:9/tunnel-request")
    demo = build_ui(engine)
    auth = share_auth(True, None)
    try:
        share_url = launch_ui(demo, "127.0.0.1", free_port(), share=True, auth=auth, block=False)
        out = capsys.readouterr().out
        assert share_url is None
        assert "could not create the public share link" in out and auth[1] in out
        result = chat(Client(demo.local_url, auth=auth, verbose=False), "Say yes.", max_new=8)[-1]
        assert message_text(result[1][-1]) == expected_reply(engine, [{"role": "user", "content": "Say yes."}], 8)
    finally:
        demo.close()



class RecordingEngine:
    """The real engine, recording how each generation ended (to see that a disconnect closes it)."""

    def __init__(self, engine):
        self._engine = engine
        self.runs: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        run = {"chunks": 0, "closed": False, "finished": False}
        self.runs.append(run)
        try:
            for chunk in self._engine.generate(*args, **kwargs):
                run["chunks"] += 1
                yield chunk
            run["finished"] = True
        finally:
            run["closed"] = True


def join_chat_raw(url: str, session_hash: str, message: str, max_new: int) -> None:
    """Queue a /chat call the way the browser does (no gradio_client), without listening yet."""
    import httpx

    config = httpx.get(f"{url}config").json()
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "chat")
    from app.handlers import GREEDY

    values = {"message": message, "system": "", "max_new": max_new, "rep": REP, "ppd": True, "highlight": False,
              "decoding": GREEDY, "seed": -1}
    components = {c["id"]: c for c in config["components"]}
    data = []
    for cid in dep["inputs"]:
        label = components[cid].get("props", {}).get("elem_id") or components[cid].get("props", {}).get("label")
        data.append(values.get({"System prompt": "system", "Max new tokens": "max_new",
                                "Repetition penalty": "rep"}.get(label, label)))
    body = {"data": data, "fn_index": dep["id"], "trigger_id": None, "session_hash": session_hash,
            "event_data": None}
    httpx.post(f"{url}gradio_api/queue/join", json=body).raise_for_status()


@pytest.mark.slow
def test_a_disconnected_client_frees_the_engine(engine):
    import httpx
    from gradio_client import Client

    from app.ui import build_ui

    recorder = RecordingEngine(engine)
    demo = build_ui(recorder)
    launch_ui(demo, "127.0.0.1", free_port(), share=False, auth=None, block=False)
    try:
        url = demo.local_url
        join_chat_raw(url, "gone-user", "Tell me a long story about a castle.", 400)
        with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": "gone-user"},
                          timeout=120) as stream:
            for line in stream.iter_lines():
                if "process_generating" in line and recorder.runs and recorder.runs[0]["chunks"] > 0:
                    break  # tokens are streaming: now the browser goes away
        deadline = time.time() + 120
        while time.time() < deadline and not (recorder.runs and recorder.runs[0]["closed"]):
            time.sleep(0.2)
        first = recorder.runs[0]
        assert first["closed"] and not first["finished"] and first["chunks"] < 400
        result = chat(Client(url, verbose=False), "Say yes.", max_new=8)[-1]
        assert message_text(result[1][-1]) == expected_reply(engine, [{"role": "user", "content": "Say yes."}], 8)
    finally:
        demo.close()


def test_calibration_view_shows_the_chosen_tree():
    from types import SimpleNamespace

    from app.calibration_view import calibration_plot, calibration_summary

    assert "built-in" in calibration_summary(SimpleNamespace())
    curve = [{"b": b, "tau": 1 + b / 20, "latency_ms": 60 + b, "tokens_per_s": 15 + b / 4} for b in (0, 4, 8)]
    report = {"b_star": 8, "cached": True, "fingerprint": "abc", "curve": curve,
              "hardware": {"description": "test cpu"}}
    engine = SimpleNamespace(calibration=report)
    assert "B\\* = 8" in calibration_summary(engine) and "cached" in calibration_summary(engine)
    plot = calibration_plot(engine)
    assert plot is None or plot.endswith(".png")
