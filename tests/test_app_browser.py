"""`imagegpt app` in a real headless Chromium (Debian's chromium and chromium-driver, through Selenium).

The app runs as a user starts it (`imagegpt app --model DIR --port N`, a process of its own) on a tiny model
built here. A screenshot of each state of the page goes under the test's temporary folder. Where the browser
cannot start, the tests fail in CI (CI=true) and are skipped elsewhere only when Chromium is not installed.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_helpers import SIDE, save_tiny_model, write_photo
from imagegpt import ImageProcessor
from imagegpt.grid import make_grid, occlude

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
    *("--disable-dev-shm-usage", "--window-size=1300,1900"),
]
WAIT = 120  # seconds for the page to answer: the machine may be busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("app-model") / "model")


def serve(model_dir: Path, log: Path):
    """`imagegpt app` on a free loopback port, started as a user would; yields its URL, then stops it."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagegpt", "app", "--model", str(model_dir), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=model_dir.parent,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while f"on {url}" not in log.read_text():
            assert process.poll() is None, f"the app exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"the app did not start: {log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def app_url(model_dir, tmp_path_factory):
    yield from serve(model_dir, tmp_path_factory.mktemp("app-log") / "app.log")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through chromedriver, with a fresh profile; a failure to start fails in CI."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)) and os.environ.get("CI") != "true":
        pytest.skip("no chromium and chromium-driver here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # raises: the test fails
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message=f"waiting for {what}")


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def text_of(driver, css: str) -> str:
    try:
        return find(driver, css).text
    except Exception:
        return ""


def open_page(driver, url: str, shots: Path):
    driver.get(url)
    ready = "return !!document.querySelector('#complete-button')"
    wait_for(driver, lambda d: d.execute_script(ready), "the page")
    shots.mkdir(exist_ok=True)
    driver.save_screenshot(str(shots / "1-opened.png"))


def upload(driver, file: Path) -> None:
    find(driver, "#complete-input input[type=file]").send_keys(str(file))


def set_number(driver, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.keys import Keys

    box = find(driver, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)


def fetch_png(driver, css: str) -> np.ndarray:
    src = find(driver, css).get_attribute("src")
    with urllib.request.urlopen(src, timeout=WAIT) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def test_an_uploaded_png_is_completed_and_its_kept_rows_are_the_quantised_input(
    browser, app_url, model_dir, tmp_path
):
    shots = tmp_path / "screenshots"
    photo = write_photo(tmp_path / "photo.png")
    keep, n = 3, 2
    open_page(browser, app_url, shots)
    upload(browser, photo)
    wait_for(browser, lambda d: "rows are kept" in text_of(d, "#view-status"), "the model's view")
    set_number(browser, "keep", keep)
    set_number(browser, "completions", n)
    wait_for(browser, lambda d: f"top {keep} rows" in text_of(d, "#view-status"), "rows kept to apply")
    browser.save_screenshot(str(shots / "2-uploaded.png"))
    find(browser, "#complete-button").click()
    wait_for(browser, lambda d: "Done" in text_of(d, "#complete-status"), "the completions")
    browser.save_screenshot(str(shots / "3-completed.png"))

    grid = fetch_png(browser, "#complete-result img")
    processor = ImageProcessor.from_pretrained(model_dir)
    original = processor.to_rgb(str(photo))
    quantised = processor.decode(processor.encode(original))
    # the same layout from the same images: original | quantised input | n completions
    expected = make_grid([[original[0], occlude(quantised, keep)[0], *[quantised[0]] * n]])
    assert grid.shape == expected.shape
    cell = 128 // SIDE * SIDE + 4  # a cell and its gutter
    kept = slice(4, 4 + keep * 128 // SIDE)
    for column in range(1, 2 + n):  # the quantised input, then every completion
        left = 4 + column * cell
        assert np.array_equal(grid[kept, left : left + cell - 4], expected[kept, 4 + cell : 2 * cell])
    assert np.array_equal(grid[:, :cell], expected[:, :cell])  # the original, resized
    assert "Download" in text_of(browser, "#complete-download")


def test_a_bad_file_gets_a_message_in_the_page(browser, app_url, tmp_path):
    shots = tmp_path / "screenshots"
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    open_page(browser, app_url, shots)
    upload(browser, bad)
    wait_for(browser, lambda d: "Cannot use this image" in text_of(d, "#view-status"), "the message")
    message = text_of(browser, "#view-status")
    browser.save_screenshot(str(shots / "2-bad-file.png"))
    assert "not an image that can be read" in message
    assert "Traceback" not in browser.page_source


def test_the_sample_tab_grows_samples_and_the_model_tab_shows_the_palette(browser, app_url, tmp_path):
    shots = tmp_path / "screenshots"
    open_page(browser, app_url, shots)
    find(browser, "#tab-sample-button").click()
    set_number(browser, "samples", 3)
    find(browser, "#sample-button").click()
    wait_for(browser, lambda d: "Done" in text_of(d, "#sample-status"), "the samples")
    browser.save_screenshot(str(shots / "2-sampled.png"))
    grid = fetch_png(browser, "#sample-result img")
    assert grid.shape == (4 + 132, 4 + 3 * 132, 3)
    find(browser, "#tab-model-button").click()
    wait_for(browser, lambda d: "parameters" in text_of(d, "#model-facts"), "the model's facts")
    browser.save_screenshot(str(shots / "3-model.png"))
    assert "8x8" in text_of(browser, "#model-facts")


def test_an_example_is_picked_and_completed(browser, app_url, tmp_path):
    shots = tmp_path / "screenshots"
    open_page(browser, app_url, shots)
    find(browser, "#examples button.thumbnail-item").click()
    wait_for(browser, lambda d: "rows are kept" in text_of(d, "#view-status"), "the example's view")
    find(browser, "#complete-button").click()
    wait_for(browser, lambda d: "Done" in text_of(d, "#complete-status"), "the completions")
    browser.save_screenshot(str(shots / "2-example-completed.png"))
    assert fetch_png(browser, "#complete-result img").shape == (4 + 132, 4 + 6 * 132, 3)


def test_two_visitors_at_once_each_get_their_own_result(browser, app_url, tmp_path):
    """Two browsers on the app at the same time, one completing an upload and one sampling: the shared
    queue runs one generation after the other and each page shows its own result."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'second-profile'}"]:
        options.add_argument(flag)
    second = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        shots = tmp_path / "screenshots"
        open_page(browser, app_url, shots)
        open_page(second, app_url, tmp_path / "screenshots-second")
        upload(browser, write_photo(tmp_path / "photo.png"))
        wait_for(browser, lambda d: "rows are kept" in text_of(d, "#view-status"), "the model's view")
        find(second, "#tab-sample-button").click()
        set_number(second, "samples", 8)
        find(browser, "#complete-button").click()
        find(second, "#sample-button").click()
        wait_for(browser, lambda d: "Done" in text_of(d, "#complete-status"), "the first visitor's result")
        wait_for(second, lambda d: "Done" in text_of(d, "#sample-status"), "the second visitor's samples")
        for driver, css in ((browser, "#complete-result img"), (second, "#sample-result img")):
            shown = f"var i = document.querySelector('{css}'); return !!i && i.complete && i.naturalWidth"
            wait_for(driver, lambda d, shown=shown: d.execute_script(shown), f"{css} shown in the page")
        browser.save_screenshot(str(shots / "2-first-visitor.png"))
        second.save_screenshot(str(tmp_path / "screenshots-second" / "2-second-visitor.png"))
        height, width, _ = fetch_png(second, "#sample-result img").shape
        assert (height - 4) // 132 * ((width - 4) // 132) == 8  # eight samples, in rows
        assert fetch_png(browser, "#complete-result img").shape[0] == 4 + 132
        assert "Traceback" not in browser.page_source + second.page_source
    finally:
        second.quit()


@pytest.fixture(scope="module")
def slow_app_url(tmp_path_factory):
    """The app on a model slow enough to stop mid-way: a random igpt-mini at 32x32 (1024 tokens an image)."""
    from app_helpers import save_model

    model_dir = save_model(tmp_path_factory.mktemp("slow-model") / "model", "igpt-mini", side=32)
    yield from serve(model_dir, tmp_path_factory.mktemp("slow-app-log") / "app.log")


def test_stop_ends_a_generation_midway_and_keeps_what_was_drawn(browser, slow_app_url, tmp_path):
    shots = tmp_path / "screenshots"
    open_page(browser, slow_app_url, shots)
    find(browser, "#tab-sample-button").click()
    set_number(browser, "samples", 8)
    find(browser, "#sample-button").click()
    grown = "var i = document.querySelector('#sample-result img'); return !!i && i.complete && i.naturalWidth"
    wait_for(browser, lambda d: d.execute_script(grown), "the first rows of the samples")
    browser.save_screenshot(str(shots / "2-growing.png"))
    find(browser, "#sample-stop").click()
    wait_for(browser, lambda d: "Stopped after" in text_of(d, "#sample-status"), "the stop")
    browser.save_screenshot(str(shots / "3-stopped.png"))
    assert "Done" not in text_of(browser, "#sample-status")
    assert "Traceback" not in browser.page_source
