"""The HTML report in a real browser: Debian's Chromium, headless, driven by Selenium through the system ChromeDriver.

The page comes from ``refdecoder reconstruct --compare-base`` on two bundled clips (tiny random VAE and weights):
its videos must play and stay in sync, the before/after slider must move, and every metric shown must be the one in
``metrics.csv``. CI installs the browser (``.ci/run``); elsewhere the test is skipped when Chromium is missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from refdecoder.cli import main
from refdecoder.data import bundled_clips
from refdecoder.inference.results import read_metrics_csv
from tests.helpers import save_random_model

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Headless Chromium in a container: no sandbox, no GPU, nothing that reaches the network.
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --autoplay-policy=no-user-gesture-required --window-size=1200,1600"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``reconstruct --compare-base`` folder of two clips, with its ``index.html``."""
    root = tmp_path_factory.mktemp("report")
    models = save_random_model(root)
    out = root / "out"
    clips = [str(p) for p in bundled_clips()[:2]]
    args = ["--out", str(out), "--vae", str(models["vae"]), "--weights", str(models["weights"]), "--no-progress"]
    assert main(["reconstruct", *clips, *args, "--size", "32x48", "--compare-base"]) == 0
    assert (out / "index.html").is_file()
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS.split(), f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _open(browser, report: Path) -> None:
    browser.get((report / "index.html").as_uri())
    deadline = time.monotonic() + 15
    script = "return [...document.querySelectorAll('video')].every(v => v.readyState >= 3 && v.duration > 0)"
    while not browser.execute_script(script):
        assert time.monotonic() < deadline, "the videos never became playable"
        time.sleep(0.1)


def test_page_is_self_contained(browser, report: Path) -> None:
    _open(browser, report)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith("data:") for name in fetched), fetched
    html = (report / "index.html").read_text()
    assert 'src="http' not in html and "<link" not in html and "<script src" not in html
    assert browser.execute_script("return document.querySelectorAll('svg, #metrics').length") >= 1


def test_videos_play_and_stay_in_sync(browser, report: Path) -> None:
    _open(browser, report)
    players = browser.find_elements("css selector", ".player")
    assert len(players) == 2  # one per clip
    player = players[0]
    roles = [v.get_attribute("data-role") for v in player.find_elements("css selector", "video")]
    assert roles == ["source", "base (VAE)", "RefDecoder"]
    fps = float(player.get_attribute("data-fps"))
    player.find_element("css selector", ".play").click()
    spreads, times = [], []
    for _ in range(8):
        time.sleep(0.15)
        now = browser.execute_script(
            "return [...arguments[0].querySelectorAll('video')].map(v => v.currentTime)", player
        )
        times.append(now[0])
        spreads.append(max(now) - min(now))
    playing = browser.execute_script("return [...arguments[0].querySelectorAll('video')].map(v => v.paused)", player)
    player.find_element("css selector", ".play").click()  # pause again
    assert not any(playing) and times[-1] != times[0]  # they play (the 1 s clip loops, so time may wrap)
    assert max(spreads) <= 2 / fps, f"videos drifted apart by up to {max(spreads):.3f} s"
    assert browser.execute_script("return [...arguments[0].querySelectorAll('video')].every(v => v.paused)", player)


def test_slider_moves_the_split(browser, report: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    _open(browser, report)
    slider = browser.find_elements("css selector", ".slider")[0]
    split = slider.find_element("css selector", ".split")
    after = slider.find_element("css selector", ".after")
    assert "50%" in after.get_attribute("style")
    for key, value in ((Keys.HOME, "0"), (Keys.END, "100"), (Keys.ARROW_LEFT, "99")):
        split.send_keys(key)
        assert split.get_attribute("value") == value
        assert f"inset(0px 0px 0px {value}%)" in browser.execute_script("return arguments[0].style.clipPath", after)
        handle = slider.find_element("css selector", ".handle")
        assert browser.execute_script("return arguments[0].style.left", handle) == f"{value}%"


def test_metrics_shown_are_those_of_metrics_csv(browser, report: Path) -> None:
    _open(browser, report)
    rows = {r["name"]: r for r in read_metrics_csv(report / "metrics.csv")}
    overall = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("psnr", "base_psnr", "delta_psnr", "ssim")}
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#metrics td[data-metric]')].filter(td => td.dataset.value).map(td => "
        "[td.parentElement.dataset.clip, td.parentElement.dataset.decoder, td.dataset.metric, td.innerText])"
    )
    seen = set()
    for clip, decoder, metric, text in cells:
        source = overall if clip == "overall" else rows[clip]
        prefix = "base_" if decoder.startswith("base") else ""
        if clip == "overall" and prefix + metric not in overall:
            continue
        digits = 2 if metric.startswith("psnr") else 3
        shown, *deltas = text.split()
        assert shown == f"{source[prefix + metric]:.{digits}f}", (clip, decoder, metric)
        if prefix == "" and "delta_" + metric in source:
            assert deltas[0] == f"{source['delta_' + metric]:+.{digits}f}"
        seen.add((clip, decoder, metric))
    assert {(c, d) for c, d, _ in seen} == {
        (clip, decoder) for clip in ["overall", *rows] for decoder in ("base (VAE)", "RefDecoder")
    }
