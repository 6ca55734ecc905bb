"""A real browser (Debian's chromium, headless through Playwright) uses the chat and takes the screenshot."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

SCREENSHOT = Path(__file__).resolve().parents[1] / "assets" / "screenshot.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(engine):
    from app.chat import launch_ui
    from app.ui import ChatDefaults, build_ui

    demo = build_ui(engine, ChatDefaults(max_new_tokens=40))
    launch_ui(demo, "127.0.0.1", free_port(), share=False, auth=None, block=False)
    yield demo.local_url
    demo.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (tests/run.sh installs it)")
def test_browser_chat_streams_reply_and_figures(app_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(app_url)
            figures = page.locator("#figures")
            expect(figures).to_contain_text("tree of", timeout=60_000)  # hardware facts before any message
            box = page.locator("#message textarea")
            box.fill("Explain in two sentences why the sky is blue.")
            box.press("Enter")
            bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
            expect(page.locator("#figures")).to_contain_text("generating", timeout=120_000)  # streaming
            expect(bot).not_to_be_empty(timeout=120_000)
            expect(figures).to_contain_text("done", timeout=300_000)
            reply = bot.inner_text()
            assert len(reply.strip()) > 10
            assert "acceptance length" in figures.inner_text() and "tokens/s" in figures.inner_text()
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # the side-by-side tab runs both modes and says whether the texts are identical
            page.get_by_role("tab", name="Side by side").click()
            page.locator("#sbs-prompt textarea").fill("Name two planets.")
            page.locator("#sbs-run").click()
            summary = page.locator("#sbs-summary")
            expect(summary).to_contain_text("identical text: yes", timeout=300_000)
            expect(summary).to_contain_text("speed-up")
        finally:
            browser.close()
