"""The chat page at / in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
type a message, watch the reply stream in, stop a second one, save a screenshot under docs/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.server import ServerProcess

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "chat_page.png"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install it with scripts/install_chromium.sh (apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--ctx", "1024", "--max-tokens", "256")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(server.url + "/")
        yield page
        browser.close()


def test_chat_page_streams_a_reply(page, server):
    sync_api.expect(page.locator("#model option")).to_have_count(1, timeout=30_000)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Write a haiku about the sea.")
    page.press("#input", "Enter")
    sync_api.expect(page.locator(".msg.user")).to_have_text("Write a haiku about the sea.")
    reply = page.locator(".msg.assistant").last
    # Streaming: text appears while the Stop button is still enabled, i.e. before the reply ends.
    sync_api.expect(reply).not_to_be_empty(timeout=120_000)
    sync_api.expect(reply).to_have_attribute("data-done", "1", timeout=120_000)
    assert page.locator("#status").inner_text().startswith("finished")
    assert reply.inner_text().strip()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 5000


def test_stop_button_cancels_the_stream(page, server):
    page.fill("#max-tokens", "200")
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    sync_api.expect(reply).not_to_be_empty(timeout=120_000)
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("stopped", timeout=30_000)
    assert server.wait_metric("gemma3_active_sequences", 0) == 0
    # A second turn still works: the conversation alternates user/assistant after a stop.
    page.fill("#max-tokens", "4")
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "1", timeout=120_000)
    assert page.locator(".msg.error").count() == 0
