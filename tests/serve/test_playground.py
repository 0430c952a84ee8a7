"""The playground in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) loads /, a sentence is typed, and every head's output streams into its own column; each
column ends with the text /v1/generate gives for the same input and controls."""
from __future__ import annotations

import shutil

import httpx
import pytest
from helpers import HEADS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Chromium and chromedriver (Debian: apt-get "
                                "install chromium chromium-driver; .ci/run installs them)")
SENTENCE = "今日は東京で会議がありました。"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_every_heads_output_streams_into_the_page(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".out[data-head]")) == len(HEADS))
    browser.find_element(By.ID, "input").send_keys(SENTENCE)
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
    assert browser.find_element(By.ID, "status").text == "done"
    outs = browser.find_elements(By.CSS_SELECTOR, ".out[data-head]")
    shown = {el.get_attribute("data-head"): el.get_attribute("textContent") for el in outs}
    assert all(int(el.get_attribute("data-pieces")) > 1 for el in outs)  # each column grew piece by piece
    body = {"inputs": SENTENCE, "per_head": {h: {"max_new_tokens": 48} for h in HEADS}}  # the page's defaults
    want = httpx.post(server.url + "/v1/generate", json=body, timeout=60).json()["results"][0]["outputs"]
    assert shown == want and all(shown.values())
