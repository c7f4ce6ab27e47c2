"""The local web chat in a real browser (Debian's chromium, driven by Playwright) against a real Redis and a real
tiny engine: upload a face, see it come back, edit it, click "stronger", morph with a second tab's face.

With STYLEBOT_SCREENSHOT=path.png set, the first test also saves the page as it shows the first face (a phone-sized
window): that is how docs/images/web-chat.png is made; with STYLEBOT_SCREENSHOTS=folder, the test of first answers
saves web-chat-first-guess.png and web-chat-refined.png there, with the encoder STYLEBOT_ENCODER names if set
(docs/images: `stylebot encoder train --model tiny --minutes 2`, then STYLEBOT_ENCODER=<weights dir>/encoders/tiny.pt
STYLEBOT_SCREENSHOTS=docs/images pytest tests/test_web.py -k first_guess)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import async_playwright, expect

from adapters.web import WebChat, serve
from bot.config import LimitsConfig
from conftest import FIXTURES, ROOT, Stack

CHROMIUM = "/usr/bin/chromium"
OBAMA = FIXTURES / "faces" / "obama.jpg"
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
async def web(stack):
    async with browsing(stack) as served:
        yield served


@contextlib.asynccontextmanager
async def browsing(stack):
    """The web chat of `stack` served on a free port, and chromium: (url, browser)."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (README's test command does it)")
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(stack.core, "127.0.0.1", 0, stop, started))
    url = await asyncio.wait_for(started, 10)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield url, browser
        await browser.close()
    stop.set()
    await asyncio.wait_for(task, 10)


async def join(browser, url: str, nickname: str, width: int = 390, height: int = 844, **context):
    """A new visitor (its own cookie) on a phone-sized window, with a nickname."""
    context = await browser.new_context(viewport={"width": width, "height": height}, **context)
    page = await context.new_page()
    await page.goto(url)
    await expect(page.locator("#engine")).to_have_text("model: tiny", timeout=15_000)
    await page.fill("#nickname", nickname)
    await page.click("#join button")
    await expect(page.locator("#composer")).to_be_visible()
    return page


# The newest message is wholly inside the scrolled chat log once its images have loaded (buttons included).
LAST_IN_VIEW = """() => {
  const log = document.getElementById("log"), last = log.lastElementChild;
  const imgs = [...last.querySelectorAll("img")];
  if (!imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
  const box = last.getBoundingClientRect(), view = log.getBoundingClientRect();
  return box.bottom <= view.bottom + 1 && box.top >= view.top - 1;
}"""

# Records whether a preview image ever appeared in a progress bubble (they come and go within a second).
WATCH_PREVIEWS = """() => {
  window.previews = [];
  new MutationObserver(() => {
    for (const img of document.querySelectorAll(".msg .progress img")) window.previews.push(img.src.slice(0, 23));
  }).observe(document.getElementById("log"), {childList: true, subtree: true});
}"""


async def buttons(result) -> list[str]:
    return await result.locator(".actions button").evaluate_all("bs => bs.map(b => b.dataset.action)")


async def send(page, text: str, photo=None) -> None:
    if photo is not None:
        await page.set_input_files("#photo", str(photo))
    await page.fill("#text", text)
    await page.click("#send")


async def test_upload_edit_stronger_and_morph_in_a_browser(web):
    url, browser = web
    alice = await join(browser, url, "alice")
    banner = alice.locator("#tiny")
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("stylebot weights download ffhq-256")
    attach = alice.locator("label.attach")
    await expect(attach).to_have_text("Photo")  # a word and an inline SVG: no emoji font needed
    assert await attach.locator("svg").count() == 1

    await alice.evaluate(WATCH_PREVIEWS)
    await send(alice, "", photo=OBAMA)
    await expect(alice.locator(".msg.you").last).to_contain_text("obama.jpg")
    await expect(alice.locator(".msg.bot").filter(has_text="finding your face: ")).to_have_count(1)
    results = alice.locator(".msg.bot:has(img.result)")
    await expect(results).to_have_count(1, timeout=60_000)
    # the acknowledgement followed the job ("waiting", "step 10 of 20, about 1 s left") and now says it is done
    await expect(alice.locator(".msg.bot").filter(has_text="finding your face: done")).to_have_count(1)
    previews = await alice.evaluate("window.previews")
    assert previews and all(p == "data:image/jpeg;base64," for p in previews)  # the face took shape on screen
    face = results.last
    await expect(face).to_contain_text("your face as the tiny model draws it")
    await expect(face).to_contain_text("dB PSNR (higher is closer); for scale, your photo at a quarter of its size")
    await expect(face).not_to_contain_text("made by")  # no host names or process ids
    await expect(face.locator(".meta")).to_have_text("made with the tiny model")
    size = await face.locator("img.result").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert size == [32, 32]
    # beside it, the aligned crop the bot found: what it saw
    await expect(face.locator("figure.aligned figcaption")).to_have_text("the face I found")
    assert await face.locator("img.aligned").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 32]
    assert await buttons(face) == ["refine", "redo"]  # a face cannot be made stronger or weaker
    await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)
    ARTIFACTS.mkdir(exist_ok=True)
    await alice.screenshot(path=str(ARTIFACTS / "web-chat-face.png"))
    if screenshot := os.environ.get("STYLEBOT_SCREENSHOT"):
        await alice.screenshot(path=screenshot)

    await send(alice, "/edit smiling")
    await expect(results).to_have_count(2, timeout=60_000)
    await expect(results.last).to_contain_text("edited: smiling")
    assert await buttons(results.last) == ["stronger", "weaker", "refine", "redo"]
    await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)
    await results.last.locator("button[data-action=stronger]").click()
    await expect(alice.locator(".msg.bot").filter(has_text="making the edit stronger: ")).to_have_count(1)
    await expect(results).to_have_count(3, timeout=60_000)
    await expect(results.last).to_contain_text("smiling x1.50")
    await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)

    # what users type is shown as text, never run as HTML
    hostile = '<img src=x onerror="document.title=\'pwned\'">'
    await send(alice, hostile)
    await expect(alice.locator(".msg.you .text").last).to_have_text(hostile)
    await expect(alice.locator(".msg.bot").last).to_contain_text("unknown command")
    assert await alice.title() != "pwned"
    assert await alice.locator(".msg .text img").count() == 0

    # a second tab is a second person: bob shares his face, alice morphs with it
    bob = await join(browser, url, "bob")
    await send(bob, "/invert", photo=OBAMA)
    await expect(bob.locator(".msg.bot:has(img.result)")).to_have_count(1, timeout=60_000)
    await send(alice, "/morph @me @bob 4")
    await expect(alice.locator(".msg.bot").last).to_contain_text("@bob has not allowed morphs")
    await send(bob, "/share")
    await send(alice, "/morph @me @bob 4")
    await expect(results).to_have_count(4, timeout=60_000)
    await expect(results.last).to_contain_text("morph, 4 frames")
    assert await buttons(results.last) == ["redo"]
    await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)
    frames = await results.last.locator("img.result").evaluate(
        "async i => (await fetch(i.src)).headers.get('content-type')")
    assert frames == "image/gif"

    # bob's own chat says who used his face, and how to stop it
    await expect(bob.locator(".msg.bot").last).to_have_text(
        "@alice made a morph with @bob's face; /unshare stops others from using it, /forget deletes everything I keep "
        "about you")

    # bob cannot see alice's results, nor rerun them
    media = await results.last.locator("img.result").get_attribute("src")
    assert (await bob.request.get(url.rstrip("/") + media)).status == 404

    await alice.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)
    await alice.set_viewport_size({"width": 1280, "height": 800})
    await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)
    await alice.screenshot(path=str(ARTIFACTS / "web-chat-desktop.png"))


async def test_the_page_shows_your_nickname_and_copies_it(web):
    """The intro asks a friend to /morph @me @you: the header shows who "you" is, and one tap copies it."""
    url, browser = web
    page = await join(browser, url, "alice", permissions=["clipboard-read", "clipboard-write"])
    await expect(page.locator("header")).to_contain_text("@alice")
    await page.locator("header button", has_text="copy").click()
    await expect(page.locator("header")).to_contain_text("copied")
    assert await page.evaluate("navigator.clipboard.readText()") == "@alice"

    # where the page has no clipboard API (served over plain http to a phone, or an old browser), the name is
    # selected, ready for the phone's own copy
    bare = await join(browser, url, "bob")
    await bare.evaluate("delete Navigator.prototype.clipboard")
    await bare.locator("header button", has_text="copy").click()
    assert await bare.evaluate("getSelection().toString()") == "@bob"
    await expect(bare.locator("header")).to_contain_text(re.compile("copied|selected"))

    # the widest name allowed: cut short on a phone, never the page pushed sideways or the button off screen
    wide = await join(browser, url, "W" * 23 + "p")
    await expect(wide.locator("header")).to_contain_text("copy")
    page_width, view_width, button_right = await wide.evaluate(
        "[document.documentElement.scrollWidth, innerWidth, document.querySelector('#copy').getBoundingClientRect().right]")
    assert view_width == 390 and page_width <= view_width and button_right <= view_width


async def test_the_tiny_banner_says_what_comes_back_and_folds_after_the_first_result(web):
    url, browser = web
    page = await join(browser, url, "dora")
    banner = page.locator("#tiny")
    await expect(banner).to_contain_text("blurry")  # an inverted face on tiny is a blurry likeness, not noise
    await expect(banner).to_contain_text("stylebot weights download ffhq-256")
    noisy = [s for s in re.split(r"(?<=\.)\s+", await banner.inner_text()) if "noise" in s]
    assert noisy and all(s.startswith("Edits") for s in noisy)  # noise is what edits make, not faces
    assert (await banner.bounding_box())["height"] > 60  # open on arrival: a newcomer reads it

    await send(page, "", photo=OBAMA)
    await expect(page.locator(".msg.bot:has(img.result)")).to_have_count(1, timeout=60_000)
    await expect(page.locator("#tiny p")).to_be_hidden()
    assert (await banner.bounding_box())["height"] < 60  # one line on a phone, not a fifth of the screen
    await banner.locator("summary").click()
    await expect(page.locator("#tiny p")).to_be_visible()
    await page.reload()  # the conversation already has a result: still one line
    await expect(page.locator(".msg.bot:has(img.result)")).to_have_count(1)
    await expect(page.locator("#tiny p")).to_be_hidden()
    await expect(banner).to_be_visible()


async def test_the_page_after_a_reload_keeps_the_conversation(web):
    url, browser = web
    page = await join(browser, url, "carol")
    await send(page, "/help")
    await expect(page.locator(".msg.bot").last).to_contain_text("/invert")
    await page.reload()
    await expect(page.locator(".msg.bot").last).to_contain_text("/invert")
    await expect(page.locator("#composer")).to_be_visible()


async def test_uploads_are_capped_before_they_are_read_and_nicknames_are_checked(client):
    s = Stack(client, limits=LimitsConfig(max_photo_bytes=100_000))
    chat = WebChat(s.core)
    async with TestClient(TestServer(chat.app)) as http:
        resp = await http.post("/command", data=FormData({"text": "/help"}))
        assert resp.status == 400 and (await resp.json())["error"] == "choose a nickname first"
        assert (await http.post("/nickname", json={"nickname": "<b>"})).status == 400
        assert (await http.post("/nickname", json={"nickname": "dave"})).status == 200
        form = FormData()
        form.add_field("text", "/invert")
        form.add_field("photo", b"\xff" * 300_000, filename="big.jpg", content_type="image/jpeg")
        resp = await http.post("/command", data=form)
        assert resp.status == 413
        assert (await resp.json())["error"] == "that upload is 293 KiB; send a photo under 98 KiB"
        other = TestClient(TestServer(chat.app))
    async with other:
        resp = await other.post("/nickname", json={"nickname": "Dave"})
        assert resp.status == 409 and (await resp.json())["error"] == "@Dave is taken: choose another nickname"
    await s.close()


async def test_a_nickname_survives_a_restart_when_a_result_arrives_before_its_owner(stack):
    """wanda asks for her face and leaves; the web chat restarts; her result arrives while she is away, then she
    comes back (same cookie): she is still wanda, and her face is there, not a request to choose a nickname."""
    from adapters.base import EventPump
    from adapters.web import COOKIE

    before = WebChat(stack.core)
    async with TestClient(TestServer(before.app)) as http:
        named = await http.post("/nickname", json={"nickname": "wanda"})
        cookie = named.cookies[COOKIE].value
        form = FormData()
        form.add_field("photo", OBAMA.read_bytes(), filename="me.jpg")
        assert (await (await http.post("/command", data=form)).json())["reply"].startswith("finding your face")
    after = WebChat(stack.core)  # the restart: nothing in memory, the same Redis
    stop = asyncio.Event()
    pump = asyncio.create_task(EventPump(stack.core, after).run(stop))
    for _ in range(600):
        if any(m.get("media") for v in after.visitors.values() for m in v.log):
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(pump, 10)
    async with TestClient(TestServer(after.app), headers={"Cookie": f"{COOKIE}={cookie}"}) as http:
        info = await (await http.get("/info")).json()
        assert info["nickname"] == "wanda"
        assert info["model"] == "tiny" and info["tiny"]  # random weights, as the engine's heartbeat says
        resp = await http.post("/command", data=FormData({"text": "/help"}, default_to_multipart=True))
        assert resp.status == 200 and "/invert" in (await resp.json())["reply"]  # no "choose a nickname first"
    [visitor] = after.visitors.values()
    assert any(m.get("media") and m["text"].startswith("your face as the tiny model draws it") for m in visitor.log)


async def test_another_visitor_is_answered_while_a_photo_is_checked(client, monkeypatch):
    """Checking a photo (decoding it whole) runs beside the event loop, not in it: while alice's photo is being
    checked, bob's /help is answered; then alice's photo is queued as before."""
    import threading

    import bot.core
    from adapters.web import COOKIE

    real, checking, answered, held = bot.core.check_photo, threading.Event(), threading.Event(), []

    def held_check(data, limits):
        checking.set()
        held.append(answered.wait(30))  # False: bob was not answered while this check ran
        return real(data, limits)

    monkeypatch.setattr(bot.core, "check_photo", held_check)
    s = Stack(client)
    chat = WebChat(s.core)
    try:
        async with TestClient(TestServer(chat.app), headers={"Cookie": f"{COOKIE}={'alice' * 5}"}) as alice, \
                TestClient(TestServer(chat.app), headers={"Cookie": f"{COOKIE}={'bob' * 8}"}) as bob:
            for http, name in ((alice, "alice"), (bob, "bob")):
                assert (await http.post("/nickname", json={"nickname": name})).status == 200
            form = FormData()
            form.add_field("photo", OBAMA.read_bytes(), filename="me.jpg")
            upload = asyncio.create_task(alice.post("/command", data=form))
            assert await asyncio.to_thread(checking.wait, 30)
            resp = await bob.post("/command", data=FormData({"text": "/help"}, default_to_multipart=True))
            assert "/invert" in (await resp.json())["reply"]
            answered.set()
            assert (await (await upload).json())["reply"].startswith("finding your face")
        assert held == [True]
    finally:
        answered.set()
        await s.close()


async def test_a_first_guess_shows_at_once_and_its_refinement_takes_its_place(client):
    """With an encoder, the photo's bubble shows the encoder's face at once, captioned as a first guess being refined;
    the refined face then replaces it in the same bubble, the first guess kept small beside it."""
    encoder = os.environ.get("STYLEBOT_ENCODER")  # the docs' pictures: tiny's encoder trained 2 minutes
    stack = Stack(client, encoder=Path(encoder) if encoder else True, invert_steps=200)
    await stack.start_engine()
    try:
        async with browsing(stack) as (url, browser):
            alice = await join(browser, url, "alice")
            await expect(alice.locator("#first")).to_have_text("first guesses: ready", timeout=15_000)
            await send(alice, "", photo=OBAMA)
            bubble = alice.locator(".msg.bot:has(img.result)")
            await expect(bubble).to_have_count(1, timeout=60_000)
            await expect(bubble.locator("figure.result figcaption")).to_have_text("first guess: refining…")
            await expect(bubble).to_contain_text("a first guess, the encoder's in one pass")
            await expect(bubble).to_contain_text("refining it now (200 steps): this message will show the result")
            assert await bubble.locator("figure.first").count() == 0
            await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)
            shots = os.environ.get("STYLEBOT_SCREENSHOTS")
            ARTIFACTS.mkdir(exist_ok=True)
            for folder in filter(None, (ARTIFACTS, shots)):
                await alice.screenshot(path=str(Path(folder) / "web-chat-first-guess.png"))
            first_src = await bubble.locator("img.result").get_attribute("src")

            await expect(bubble.locator("figure.first figcaption")).to_have_text("first guess (encoder)",
                                                                                timeout=120_000)
            await expect(bubble).to_have_count(1)  # the same bubble, not a second one
            await expect(bubble.locator("figure.result figcaption")).to_have_text("refined")
            await expect(bubble).to_contain_text("the encoder's first guess refined by 200 optimisation steps")
            assert await bubble.locator("img.first").get_attribute("src") == first_src
            assert await bubble.locator("img.result").get_attribute("src") != first_src
            await expect(alice.locator(".msg.bot").filter(has_text="finding your face: done")).to_have_count(1)
            assert await buttons(bubble) == ["refine", "redo"]
            await alice.wait_for_function(LAST_IN_VIEW, timeout=5_000)
            for folder in filter(None, (ARTIFACTS, shots)):
                await alice.screenshot(path=str(Path(folder) / "web-chat-refined.png"))
    finally:
        await stack.close()
