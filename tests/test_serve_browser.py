"""The chat page at / in a real headless Chromium (selenium): type a question, read the streamed answer,
which must equal the server's greedy chat answer, with a system prompt and the stats line.
Skipped, with the reason, where no Chromium and chromedriver are installed
(Debian: apt-get install -y chromium chromium-driver)."""

from __future__ import annotations

import shutil
import time

import pytest
from test_serve import MODEL, PROMPTS, LiveServer, _server

CHROME = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROME and DRIVER), reason="no Chromium/chromedriver here "
                                "(apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def live(loaded):
    s = LiveServer(_server(loaded, max_tokens=12))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROME
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(fn, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_chat_page_streams_an_answer(live, browser):
    from selenium.webdriver.common.by import By

    system = "You are terse."
    expected = live.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[3]}],
        temperature=0).choices[0].message.content
    browser.get(live.url + "/")
    assert _wait(lambda: browser.find_element(By.ID, "model").text == MODEL)
    browser.find_element(By.ID, "system").send_keys(system)
    browser.find_element(By.ID, "input").send_keys(PROMPTS[3])
    browser.find_element(By.ID, "send").click()
    answer = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#answer-1[data-done='1']"))[0]
    assert answer.text.strip() == expected.strip() and expected.strip()
    assert "tokens" in browser.find_element(By.ID, "stats").text and "tok/s" in browser.find_element(By.ID, "stats").text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == PROMPTS[3]
