"""A real browser opens netron on a compiled benchmark model (Debian chromium + chromedriver,
driven by Selenium; nothing downloads a browser). The screenshot is left in test-results/."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calib import artifact

ROOT = Path(__file__).resolve().parents[2]
SHOT = ROOT / "test-results" / "netron_fashion_resnet_npu16.png"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _wait(predicate, seconds: float, what: str):
    end = time.time() + seconds
    while time.time() < end:
        if got := predicate():
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_netron_renders_compiled_benchmark_model_in_chromium(tmp_path):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: install.sh installs Debian's chromium and chromium-driver")
        pytest.skip("Debian chromium and chromium-driver are not installed")
    from selenium.webdriver.common.by import By

    from calib.config import CalibConfig
    from tests.waps_tvm.test_compile import _benchmark
    from waps_tvm import api, cli
    from waps_tvm.datasets import load_dataset
    model, data = _benchmark("fashion_resnet")
    calib = load_dataset(data, "calib", n=32, input_shape=model.input_shape)
    _, art = api.quantize(model, calib.x, CalibConfig(wbits=2, abits=4, iters=3, samples=32, progress=False))
    waps = artifact.save(art, tmp_path / "fr.waps")
    out = tmp_path / "out"
    assert cli.main(["compile", str(waps), "--target", "npu16", "-o", str(out), "-q"]) == 0

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "waps_tvm.cli", "inspect", str(out), "--netron", "--port",
                               str(port), "--serve-seconds", "180"], stdout=subprocess.PIPE, text=True)
    driver = None
    try:
        line = _wait(lambda: (ln := server.stdout.readline()) and "netron serving" in ln and ln, 60, "netron")
        address = line.split(" at ")[-1].strip()
        assert address == f"http://127.0.0.1:{port}"
        driver = _browser()
        driver.get(address)

        def rendered():
            for b in driver.find_elements(By.TAG_NAME, "button"):   # netron's first-run consent dialog
                if b.is_displayed() and b.text.strip() == "Accept":
                    b.click()
            return driver.find_elements(By.CSS_SELECTOR, "g.node")
        nodes = _wait(rendered, 60, "netron to draw the graph")
        labels = {t.get_attribute("textContent") for t in driver.find_elements(By.CSS_SELECTOR, "g.node text")}
        assert {"GroupConv", "ShiftAdd", "Requant", "Quantize", "Dequantize"} <= labels, sorted(labels)[:30]
        assert len(nodes) >= 40
        SHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SHOT)) and SHOT.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)
