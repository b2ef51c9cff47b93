"""The operator console in a real headless Chromium, against a real proxy with the embedded
model on a simulated two-device GPU: start the proxy from Settings, activate the model, send a
few requests, then open every page with that data on it (Playground streams a reply, Leases asks
before it force-releases a lease) and stop the proxy. A screenshot of each page goes to
test-artifacts/console/ (docs/img/console/ holds a copy of one run's).

Needs Debian's chromium and chromium-driver. ``.ci/run`` installs them and sets
``IMAGEWORKS_REQUIRE_BROWSER=1``, which makes their absence a failure; elsewhere (a developer's
``scripts/check.sh`` without them) the test is skipped with the reason in the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from imageworks.chat_proxy.engines.backends.llamacpp import DEFAULT_TEMPLATE
from imageworks.gui.supervisor import ProxySupervisor
from testkit.gpu import simulated_gpu
from testkit.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "console"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

MODEL = "gemma3-270m"
STARTED = time.monotonic()
REQUIRED = os.environ.get("IMAGEWORKS_REQUIRE_BROWSER") == "1"

if not (CHROMIUM and CHROMEDRIVER) and not REQUIRED:
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed here "
        "(apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


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
        "--window-size=1440,1200",
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


def charts_drawn(driver, timeout: float = 30) -> None:
    """Wait until every plotly chart on the page has drawn its plot (not just its frame)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(
            "return [...document.querySelectorAll(\"[data-testid='stPlotlyChart']\")]"
            ".every(chart => chart.querySelector('.main-svg'))"
        ):
            return
        time.sleep(0.2)


def shot(driver, name: str) -> None:
    settled(driver)
    charts_drawn(driver)
    print(f"{time.monotonic() - STARTED:6.1f} s  {name}")
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


def chat(proxy_url: str, model: str, text: str, stream: bool = False) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 12}
    answer = httpx.post(
        proxy_url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=120
    )
    return answer.status_code


def on_simulated_gpu(workdir: Path) -> dict[str, str]:
    """Two simulated 16 GB devices; the embedded model (a CPU model) is declared to need 600 MiB
    and holds them on the device it is placed on (testkit.sim_hold); another program holds 3 GB
    of device 1."""
    registry = workdir / "configs" / "model_registry.curated.json"
    entries = json.loads(registry.read_text())
    for entry in entries:
        if entry["name"] == MODEL:
            entry["vram_estimate_mb"] = 600  # a GPU model to the proxy: placed and counted
    registry.write_text(json.dumps(entries, indent=2))
    sim, env = simulated_gpu(workdir, [16000, 16000])
    assert sim.allocate(1, 3000, pid=os.getpid(), label="other program")
    template = ["{python}", "-m", "testkit.sim_hold", "--mb", "600", "--", *DEFAULT_TEMPLATE]
    return {
        **env,
        "CHAT_PROXY_LLAMACPP_LAUNCH_TEMPLATE": json.dumps(template),
        "PYTHONPATH": str(REPO),  # testkit, for the engine's wrapper
    }


@pytest.mark.timeout(480)  # nine pages, on two shared cores in CI
def test_operator_flow_in_a_real_browser(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    proxy_url = f"http://127.0.0.1:{free_port()}"
    gui_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
        "IMAGEWORKS_GUI_WORKDIR": str(tmp_path),
        # The proxy the console starts inherits these, and its engines from it.
        **on_simulated_gpu(tmp_path),
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
        shot(browser, "01-settings-proxy-stopped.png")
        # An operator tool: Streamlit's "Deploy" button is hidden (client.toolbarMode).
        assert not browser.find_elements("xpath", "//button[contains(., 'Deploy')]")
        browser.get(console + "/gpu")
        wait_text(browser, "Chat proxy unavailable")  # every page says so, and recovers
        browser.get(console + "/settings")
        click(browser, "Start Chat Proxy")
        wait_text(browser, "Chat proxy running")
        shot(browser, "02-settings-proxy-running.png")

        browser.get(console + "/models")
        wait_text(browser, MODEL)
        click(browser, "Activate")
        wait_text(browser, f"{MODEL} is ready")
        shot(browser, "03-models.png")

        # A few requests as clients send them, one of them for a model that does not exist.
        assert chat(proxy_url, MODEL, "Name a colour.") == 200
        assert chat(proxy_url, MODEL, "Name a fruit.", stream=True) == 200
        assert chat(proxy_url, MODEL, "Name a city.") == 200
        assert chat(proxy_url, "no-such-model", "Hello?") == 404

        browser.get(console + "/playground")
        wait_text(browser, "Prompt")
        limit = browser.find_element("css selector", "input[aria-label='Max tokens']")
        limit.send_keys(Keys.CONTROL, "a")
        limit.send_keys("24", Keys.ENTER)  # a short reply: two shared cores in CI
        settled(browser)
        prompt = browser.find_element("css selector", "textarea")
        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys("Say hello in five words.")
        click(browser, "Send")
        wait_text(browser, "tokens/s")
        shot(browser, "04-playground.png")

        browser.get(console + "/")
        wait_text(browser, f"{MODEL} · llamacpp")
        shot(browser, "05-dashboard.png")

        browser.get(console + "/gpu")
        wait_text(browser, f"{MODEL} 600 MB")
        wait_text(browser, "3,000 MB")  # the other program, on device 1
        shot(browser, "06-gpu.png")

        browser.get(console + "/activity")
        wait_text(browser, "Requests per second")
        wait_text(browser, "Errors by code")
        shot(browser, "07-activity.png")

        browser.get(console + "/logs")
        wait_text(browser, "lines of the Engine (autostart) log")
        shot(browser, "08-logs.png")

        browser.get(console + "/registry")
        wait_text(browser, "layers in")
        browser.find_element("xpath", f"//summary[contains(., '{MODEL}')]").click()  # its fields
        wait_text(browser, "curated")
        shot(browser, "09-registry.png")

        lease = {"owner": "judge-vision", "reason": "stage 2 grading", "ttl_s": 900}
        assert httpx.post(proxy_url + "/v1/gpu/lease", json=lease, timeout=60).is_success
        browser.get(console + "/leases")
        wait_text(browser, "judge-vision")
        click(browser, "Force release")
        wait_text(browser, "lease now?")
        shot(browser, "10-leases-confirm.png")
        click(browser, "Yes, release it")
        wait_text(browser, "lease released")

        browser.get(console + "/settings")
        wait_text(browser, "Chat proxy running")
        click(browser, "Stop Chat Proxy")
        wait_text(browser, "stopped (pid")
    finally:
        ProxySupervisor(proxy_url, tmp_path).stop()  # if a step failed midway
        gui.send_signal(signal.SIGTERM)
        gui.wait(30)
