"""The live calls page in a real browser (Debian's chromium, driven by Playwright) while calls
run against the gateway on loopback: a call appears, its transcript grows, it moves to ended."""

from __future__ import annotations

import shutil

import pytest

from callray.sim.client import RetellClient
from tests.test_gateway import READ_TOKEN, gateway  # noqa: F401 - the served gateway fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def page():
    from playwright.async_api import async_playwright

    assert CHROMIUM, "this test needs Debian's chromium: apt-get install chromium (.ci/run installs it)"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def test_an_operator_watches_a_call_appear_talk_and_end(gateway, page, tmp_path):  # noqa: F811
    await page.goto(f"{gateway.http}/ui?token={READ_TOKEN}")
    assert "token=" not in page.url  # the token left the address bar
    await page.wait_for_selector("#page:not([hidden])")
    client = await RetellClient(gateway.ws, "call-watched").connect()
    try:
        await client.complete(0)
        row = page.locator('tr[data-call="call-watched"]')
        await row.wait_for(timeout=10_000)  # the call appears
        await client.turn(1, "Hi, my name is Maria")
        await row.click()
        await page.get_by_text("Hi, my name is Maria").wait_for(timeout=10_000)
        await client.turn(2, "What are your hours?")
        await page.get_by_text("What are your hours?").wait_for(timeout=10_000)  # the transcript grows
        assert "first sentence" in await page.locator("#transcript").inner_text()
        await client.turn(3, "That's all, goodbye")  # the clinic agent hangs up
    finally:
        await client.close()
    await page.locator('tr[data-ended="call-watched"]').wait_for(timeout=15_000)  # it moved to ended
    assert await page.locator('tr[data-call="call-watched"]').count() == 0
    delays = await page.evaluate("window.__callray_delays")  # one per turn rendered while the call was live
    assert len(delays) >= 2  # turns 1 and 2 at least (how soon: harness/livepage.py measures it)
    await page.screenshot(path=str(tmp_path / "live.png"), full_page=True)


async def test_without_the_token_the_page_asks_for_it_and_a_wrong_one_shows_no_call(gateway, page):  # noqa: F811
    await page.goto(f"{gateway.http}/ui/")
    await page.wait_for_selector("#token-form:not([hidden])")
    await page.fill("#token", "wrong-token")
    await page.click("#token-form button")
    await page.wait_for_selector("#token-form:not([hidden])")  # refused: asked again, no data shown
    assert await page.locator("#page").is_hidden()
