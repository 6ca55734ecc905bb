"""The Gradio Blocks: a Chat tab with live figures, and a Side-by-side tab."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ppd_core.engine import Engine

from .calibration_view import calibration_plot, calibration_summary
from .conversation import Conversation
from .figures import MemoryPeaks, figures, figures_markdown
from .handlers import GREEDY, PRESETS, ChatHandlers

# One engine, one generation at a time: every decoding event shares this concurrency slot.
ENGINE_SLOT = "engine"

CSS = """
mark.ppd-guess { background: #fde68a; color: inherit; border-radius: 3px; padding: 0 1px; }
.dark mark.ppd-guess { background: #92400e; }
"""


def preload_matplotlib() -> None:
    """Gradio imports matplotlib lazily around every event to switch its backend; two events starting at
    once can race on that first import and fail one of them (seen in tests: AttributeError
    '_original_backend'). Importing it once before serving avoids the race."""
    try:
        import matplotlib

        matplotlib.get_backend()
    except ImportError:
        pass


@dataclass(frozen=True)
class ChatDefaults:
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    ppd: bool = True
    highlight: bool = True
    system_prompt: str = ""


def build_ui(engine: Engine, defaults: ChatDefaults | None = None) -> gr.Blocks:
    """The app, ready to `.launch()` (the caller picks host, port, share and auth)."""
    d = defaults or ChatDefaults()
    preload_matplotlib()
    h = ChatHandlers(engine)
    first = figures(engine, None, d.ppd, MemoryPeaks())
    engine_event = {"concurrency_id": ENGINE_SLOT, "concurrency_limit": 1}

    with gr.Blocks(title="PPD Chat") as demo:
        # callables: a fresh conversation (with its own KV cache) per browser session
        conv = gr.State(lambda: Conversation())
        peaks = gr.State(lambda: MemoryPeaks())
        gr.Markdown("## PPD Chat\nParallel Prompt Decoding: the same answers as plain greedy decoding, "
                    "in fewer forward passes. <mark class=\"ppd-guess\">Highlighted</mark> tokens came from "
                    "accepted guesses.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(height=480, label="Chat", elem_id="chatbot", buttons=["copy"])
                    message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                         elem_id="message", autofocus=True)
                    with gr.Row():
                        send_btn = gr.Button("Send", variant="primary", elem_id="send")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                        clear_btn = gr.Button("Clear", elem_id="clear")
                with gr.Tab("Side by side"):
                    gr.Markdown("One prompt, decoded plain and with PPD. They take turns step by step, so on a "
                                "machine with few cores neither slows the other down.")
                    sbs_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="sbs-prompt")
                    sbs_btn = gr.Button("Run both", variant="primary", elem_id="sbs-run")
                    with gr.Row():
                        with gr.Column():
                            gr.Markdown("**Plain (PPD off)**")
                            plain_panel = gr.HTML(elem_id="sbs-plain")
                        with gr.Column():
                            gr.Markdown("**PPD**")
                            ppd_panel = gr.HTML(elem_id="sbs-ppd")
                    sbs_summary = gr.Markdown(elem_id="sbs-summary")
                    sbs_json = gr.JSON(visible=False)
            with gr.Column(scale=2):
                figures_md = gr.Markdown(figures_markdown(first), elem_id="figures")
                figures_json = gr.JSON(first, visible=False)
                ppd = gr.Checkbox(d.ppd, elem_id="ppd",
                                  label="PPD on (off = plain decoding: same text; same distribution when sampling)")
                highlight = gr.Checkbox(d.highlight, label="Highlight tokens from accepted guesses",
                                        elem_id="highlight")
                with gr.Accordion("Settings", open=False):
                    system = gr.Textbox(d.system_prompt, label="System prompt", lines=3,
                                        placeholder="Empty: the model's own default system prompt")
                    max_new = gr.Slider(1, 2048, value=d.max_new_tokens, step=1, label="Max new tokens")
                    rep = gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.01, label="Repetition penalty")
                    decoding = gr.Radio(list(PRESETS), value=GREEDY, label="Decoding", elem_id="decoding")
                    seed = gr.Number(-1, precision=0, label="Seed (-1 = a new one per reply)", elem_id="seed")
                    gr.Markdown("Greedy: PPD gives exactly the same text. Sampling: PPD verifies guesses by "
                                "lossless speculative sampling, so replies follow exactly the distribution of "
                                "PPD off; a fixed seed makes them reproducible.")
                with gr.Accordion("Calibration", open=False):
                    gr.Markdown(calibration_summary(engine), elem_id="calibration")
                    plot = calibration_plot(engine)
                    if plot:
                        gr.Image(plot, show_label=False, interactive=False)

        chat_outputs = [message, chatbot, figures_md, figures_json, conv, peaks]
        send_evt = gr.on([send_btn.click, message.submit], h.send,
                         [message, system, max_new, rep, ppd, highlight, decoding, seed, conv, peaks], chat_outputs,
                         api_name="chat", show_progress="hidden", **engine_event)
        regen_evt = regen_btn.click(h.regenerate, [system, max_new, rep, ppd, highlight, decoding, seed, conv, peaks],
                                    chat_outputs, api_name="regenerate", show_progress="hidden", **engine_event)
        sbs_evt = sbs_btn.click(h.side_by_side, [sbs_prompt, system, max_new, rep, highlight, decoding, seed, peaks],
                                [plain_panel, ppd_panel, sbs_summary, sbs_json, peaks],
                                api_name="side_by_side", show_progress="minimal", **engine_event)
        stop_btn.click(None, None, None, cancels=[send_evt, regen_evt, sbs_evt], api_name="stop")
        # Clear also cancels a running reply, so the conversation is never changed under a generator.
        clear_btn.click(h.clear, [ppd, conv, peaks], chat_outputs, api_name="clear", cancels=[send_evt, regen_evt],
                        **engine_event)
        highlight.change(h.rerender, [highlight, conv], chatbot, api_name="rerender")
    return demo
