"""The operator console in a real headless Chromium, against a real proxy with the embedded
model: open the console, start the proxy from Settings, activate the model from Models, see it
on the Dashboard, stop the proxy. Screenshots of each page go to test-artifacts/console/.

Needs Debian's chromium and chromium-driver. ``.ci/run`` installs them and sets
``IMAGEWORKS_REQUIRE_BROWSER=1``, which makes their absence a failure; elsewhere (a developer's
``scripts/check.sh`` without them) the test is skipped with the reason in the summary.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imageworks.gui.supervisor import ProxySupervisor
from testkit.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "console"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

REQUIRED = os.environ.get("IMAGEWORKS_REQUIRE_BROWSER") == "1"

if not (CHROMIUM and CHROMEDRIVER) and not REQUIRED:
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed here "
        "(apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.subprocess


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, (
        "IMAGEWORKS_REQUIRE_BROWSER=1 but chromium and chromium-driver are not installed"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_text(driver, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in driver.find_element("tag name", "body").text:
            return
        time.sleep(0.25)
    raise AssertionError(
        f"{text!r} never appeared; page shows:\n"
        f"{driver.find_element('tag name', 'body').text[:2000]}"
    )


def settled(driver, timeout: float = 30) -> None:
    """Wait until Streamlit has finished running the page (no stale elements on screen)."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        running = driver.find_elements("css selector", "[data-testid='stStatusWidget']")
        stale = driver.find_elements("css selector", "[data-stale='true']")
        if running or stale:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.5:
            return
        time.sleep(0.1)


def shot(driver, name: str) -> None:
    settled(driver)
    driver.save_screenshot(str(ARTIFACTS / name))


def click(driver, label: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        buttons = driver.find_elements("xpath", f"//button[contains(., '{label}')]")
        if buttons:
            buttons[0].click()
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no button {label!r}")
        time.sleep(0.25)


def test_operator_flow_in_a_real_browser(browser, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    proxy_url = f"http://127.0.0.1:{free_port()}"
    gui_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
        "IMAGEWORKS_GUI_WORKDIR": str(tmp_path),
    }
    gui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imageworks.gui.cli",
            "--port",
            str(gui_port),
            "--proxy-url",
            proxy_url,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    console = f"http://127.0.0.1:{gui_port}"
    try:
        wait_for_port(gui_port, timeout=60)
        browser.get(console + "/settings")
        wait_text(browser, "Chat proxy stopped")
        shot(browser, "1-settings-proxy-stopped.png")
        # An operator tool: Streamlit's "Deploy" button is hidden (client.toolbarMode).
        assert not browser.find_elements("xpath", "//button[contains(., 'Deploy')]")
        click(browser, "Start Chat Proxy")
        wait_text(browser, "Chat proxy running")
        shot(browser, "2-settings-proxy-running.png")

        browser.get(console + "/models")
        wait_text(browser, "gemma3-270m")
        click(browser, "Activate via Proxy")
        wait_text(browser, "gemma3-270m is ready")
        shot(browser, "3-models-activated.png")

        browser.get(console + "/")
        wait_text(browser, "Active model")
        wait_text(browser, "gemma3-270m · llamacpp")
        shot(browser, "4-dashboard-active-model.png")

        browser.get(console + "/settings")
        wait_text(browser, "Chat proxy running")
        click(browser, "Stop Chat Proxy")
        wait_text(browser, "stopped (pid")
        shot(browser, "5-settings-proxy-stopped-again.png")
    finally:
        ProxySupervisor(proxy_url, tmp_path).stop()  # if a step failed midway
        gui.send_signal(signal.SIGTERM)
        gui.wait(30)
