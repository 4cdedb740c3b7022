"""`aigc score --tokens --html FILE`: the page in a real headless browser (Debian's Chromium through
Selenium): tokens, legend and chart rendered, a token's details on keyboard focus and on hover;
the page self-contained and its text escaped; the file written atomically."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat

import pytest

TEXT = 'Tags like <b>bold</b> & "quotes" stay text.\nA second line, café 🤖.\n'


def _browser_paths() -> tuple[str, str] | None:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    paths = _browser_paths()
    if paths is None:
        pytest.skip("no Chromium and chromedriver on PATH (apt-get install -y chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    yield driver
    driver.quit()


def _page(cli, tmp_path, model: str, text: str, *extra: str) -> tuple[str, list[dict]]:
    src, page = tmp_path / "in.txt", tmp_path / "view.html"
    src.write_text(text)
    r = cli("score", str(src), "--model", model, "--tokens", "--html", str(page), "--format", "jsonl", *extra)
    assert r.exit_code == 0, r.stderr
    return str(page), [json.loads(line) for line in r.stdout.splitlines()]


def _rgb(colour: str) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, 1)"


@pytest.mark.parametrize("model,text", [("tiny-random", TEXT), ("tiny-random-zh", "春眠不觉晓，处处闻啼鸟。\n夜来风雨声。")])
def test_page_in_a_browser(cli, tmp_path, browser, model, text):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from aigc_cli.frontends.cli.render import GLTR_COLOURS

    page, (record,) = _page(cli, tmp_path, model, text)
    browser.get("file://" + page)
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tokens .tok")
    assert len(tokens) == len(record["tokens"])
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('.tokens .tok')).map(e => "
        "Array.from(e.childNodes).filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.textContent).join(''))"
    )
    assert shown == [t["token"] for t in record["tokens"]] and "".join(shown) == text  # the text itself, markup as text
    assert not browser.find_elements(By.CSS_SELECTOR, ".tokens b")
    for element, t in list(zip(tokens, record["tokens"]))[:8]:
        assert element.value_of_css_property("background-color") == _rgb(GLTR_COLOURS[t["bucket"]])
        assert not element.find_element(By.CSS_SELECTOR, ".tip").is_displayed()  # details only when asked
    legend = browser.find_element(By.CSS_SELECTOR, ".legend")
    assert legend.is_displayed() and [li.text for li in legend.find_elements(By.TAG_NAME, "li")] == [
        "top 10", "top 100", "top 1,000", "beyond", "not scored"
    ]
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert chart.is_displayed() and chart.size["height"] > 50
    bars = chart.find_elements(By.CSS_SELECTOR, "g.bar")
    assert [b.get_attribute("data-bucket") for b in bars] == ["top10", "top100", "top1000", "beyond"]
    scored = sum(record["buckets"].values())
    for bar in bars:
        height = float(bar.find_element(By.TAG_NAME, "rect").get_attribute("height"))
        assert height == round(record["buckets"][bar.get_attribute("data-bucket")] / scored * 120)

    # keyboard: Tab from the page's start reaches the first token, whose details then show
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused == tokens[0]
    tip = focused.find_element(By.CSS_SELECTOR, ".tip")
    first = record["tokens"][0]
    assert tip.is_displayed()
    assert f"rank {first['rank']}" in tip.text and f"{math.exp(first['logprob']):.2%}" in tip.text
    assert all(f"{math.exp(a['logprob']):.2%}" in tip.text for a in first["top"])
    focused.send_keys(Keys.TAB)
    assert browser.switch_to.active_element == tokens[1] and not tip.is_displayed()
    # the pointer: hovering over a token shows its details too
    ActionChains(browser).move_to_element(tokens[3]).perform()
    assert tokens[3].find_element(By.CSS_SELECTOR, ".tip").is_displayed()


def test_page_is_self_contained_and_escaped(cli, tmp_path):
    page, _ = _page(cli, tmp_path, "tiny-random", TEXT + "</span><script>alert(1)</script>")
    html = open(page, encoding="utf-8").read()
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|src=|href=", html, re.I)
    assert html.count("&lt;") >= 4 + 3  # the text's "<" (tokens, and again in their details) as entities


def test_page_written_atomically_keeping_the_file_mode(cli, tmp_path):
    page = tmp_path / "view.html"
    page.write_text("old")
    os.chmod(page, 0o640)
    src = tmp_path / "in.txt"
    src.write_text("Hello world.")
    assert cli("score", str(src), "--model", "tiny-random", "--tokens", "--html", str(page)).exit_code == 0
    assert stat.S_IMODE(page.stat().st_mode) == 0o640 and page.read_text().startswith("<!doctype html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "view.html"]  # no temporary file left
