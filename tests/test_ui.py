"""`cube ui` in a real browser (headless Chromium via Selenium) against real lab hosts: submit
from the Submit page, watch the log stream in without a reload, see the job succeed, download
outputs, cancel a long job, run an uploaded ZIP cube, refuse hostile ZIPs, and refuse requests
without the token off loopback. Screenshots of each page go to the session's temp folder."""

from __future__ import annotations

import ipaddress
import subprocess
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import REPO
from tests.fixtures.browser import copy_cube, screenshot, wait_for_download

pytestmark = pytest.mark.integration
HELLO = REPO / "cubes" / "hello"
SLEEPER = REPO / "tests" / "cubes" / "sleeper"
TOKEN = "lab-token-0123456789abcdef"


# ------------------------------------------------------------------------------- helpers

def wait(driver, condition, timeout: float = 60, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message)


def text(driver, css: str) -> str:
    for _ in range(5):   # an element the page's script just replaced is looked up again
        found = driver.find_elements(By.CSS_SELECTOR, css)
        try:
            return found[0].text if found else ""
        except StaleElementReferenceException:
            continue
    return ""


def shows(driver, css: str, needle: str, timeout: float = 60) -> bool:
    """True once the element's text holds `needle`: parts of a page are swapped in by its
    script (the outputs when a job ends), so a check waits for them instead of racing them."""
    try:
        wait(driver, lambda d: needle in text(d, css), timeout)
    except TimeoutException:
        return False
    return True


def submit(driver, base: str, *, tasks: str, host: str, cube: str | None = None,
           zip_path: Path | None = None) -> None:
    driver.get(base + "/submit")
    source = "zip" if zip_path else "folder"
    driver.find_element(By.CSS_SELECTOR, f'input[name="source"][value="{source}"]').click()
    if cube:
        Select(driver.find_element(By.ID, "cube")).select_by_value(cube)
    if zip_path:
        driver.find_element(By.ID, "zip").send_keys(str(zip_path))
    for field, value in (("tasks", tasks), ("host", host)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    button = driver.find_element(By.ID, "submit")
    button.click()
    # the post answers with a new page (the job, or the form with its errors): wait until the
    # old one is gone, so no check reads the form as it was before the answer came
    wait(driver, staleness_of(button), 120, "the submit page never answered")


def open_job(driver, timeout: float = 180) -> str:
    """After a submit: wait for the submission page to hand over to the job page."""
    def arrived(d):
        error = text(d, "#sub-error")
        assert not error, f"submission failed: {error}\n{text(d, '#messages')}"
        return "/jobs/" in d.current_url
    wait(driver, arrived, timeout, "the job page did not open")
    return driver.current_url.rsplit("/", 1)[-1]


def wait_state(driver, state: str, timeout: float = 120) -> None:
    wait(driver, lambda d: text(d, "#state") == state, timeout,
         f"state {text(driver, '#state')!r}, not {state!r}; log: {text(driver, '#log')[-800:]}")


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def zip_of_folder(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder.parent).as_posix())
    return path


# -------------------------------------------------------------------------------- tests

def test_submit_hello_streams_the_log_live_and_downloads_outputs(lab_home, browser, ui_server,
                                                                 tmp_path):
    copy_cube(HELLO, tmp_path / "cubes", keep=("names.yaml",))
    base = ui_server(cubes_dir=tmp_path / "cubes")
    submit(browser, base, cube="hello", tasks="greet,summarize", host="lab1")
    job_id = open_job(browser)
    browser.execute_script("window.__sameDocument = 'yes'")
    wait(browser, lambda d: "Hello, Ada!" in text(d, "#log"), 60, "no log line arrived")
    wait_state(browser, "succeeded")
    log = text(browser, "#log")
    assert "Hello, Linus!" in log and "3 greetings: Ada, Grace, Linus" in log
    assert browser.execute_script("return window.__sameDocument") == "yes", "the page reloaded"
    assert shows(browser, "#shell-cube", f"cube remote shell {job_id}")
    assert text(browser, "#shell-ssh").startswith("ssh ")
    screenshot(browser, "job", readme=True)

    browser.find_element(By.LINK_TEXT, "report/summary.txt").click()
    summary = wait_for_download(browser.downloads, "summary.txt")
    assert summary.read_text() == "3 greetings: Ada, Grace, Linus\n"
    browser.find_element(By.CSS_SELECTOR, 'a[href$="/zip/greetings"]').click()
    archive = wait_for_download(browser.downloads, f"{job_id}-greetings.zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == [
        "greetings/Ada.txt", "greetings/Grace.txt", "greetings/Linus.txt"]

    browser.get(f"{base}/jobs/{job_id}/files/greetings")
    assert shows(browser, "#files", "Ada.txt")
    screenshot(browser, "files")
    browser.get(f"{base}/jobs?host=lab1&state=succeeded")
    assert shows(browser, "#jobs", job_id)
    screenshot(browser, "jobs")
    browser.get(f"{base}/jobs?state=failed")
    assert job_id not in text(browser, "main")


def test_hosts_page_shows_the_fleet(lab_home, browser, ui_server):
    base = ui_server()
    browser.get(base + "/hosts")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#hosts tr[data-host="lab2"]'), 60,
         "the fleet table did not appear")
    rows = text(browser, "#hosts")
    assert "lab1" in rows and "lab2" in rows and "yes" in rows
    screenshot(browser, "hosts")


def test_cancel_a_long_job_from_its_page(lab_home, browser, ui_server, tmp_path):
    copy_cube(SLEEPER, tmp_path / "cubes")
    base = ui_server(cubes_dir=tmp_path / "cubes")
    submit(browser, base, cube="sleeper", tasks="wait", host="lab2")
    open_job(browser)
    wait(browser, lambda d: "tick 2" in text(d, "#log"), 60, "no ticks arrived")
    wait(browser, lambda d: "tick 4" in text(d, "#log"), 30, "the log stopped growing")
    assert text(browser, "#state") == "running"
    browser.find_element(By.ID, "cancel").click()
    wait(browser, lambda d: "Cancel sent." in text(d, "#done"), 30)
    wait_state(browser, "cancelled", 60)
    assert not browser.find_elements(By.ID, "cancel")
    screenshot(browser, "cancelled")


def test_an_uploaded_zip_cube_runs(lab_home, browser, ui_server, tmp_path):
    cube = copy_cube(HELLO, tmp_path / "src", keep=("names.yaml",))
    archive = zip_of_folder(cube, tmp_path / "hello.zip")
    base = ui_server()
    submit(browser, base, zip_path=archive, tasks="greet", host="lab1")
    first = open_job(browser)
    wait_state(browser, "succeeded")
    assert shows(browser, "#log", "Hello, Grace!")
    assert shows(browser, "#outputs", "greetings")

    browser.find_element(By.ID, "fetch").click()
    wait(browser, lambda d: "Outputs fetched" in text(d, "#done"), 30, text(browser, "main"))
    browser.find_element(By.ID, "rerun").click()
    second = open_job(browser)
    assert second != first
    wait_state(browser, "succeeded")
    assert shows(browser, "#log", "Hello, Ada!") and shows(browser, "#live", "greet")


def test_hostile_zips_are_refused_with_the_reason_beside_the_field(browser, ui_server, tmp_path,
                                                                  cube_home):
    base = ui_server()
    escape = make_zip(tmp_path / "escape.zip", {"mlcube.yaml": b"name: x\n",
                                                "../../evil.sh": b"echo pwned\n"})
    submit(browser, base, zip_path=escape, tasks="greet", host="lab1")
    assert shows(browser, "#error-zip", "leaves the folder")
    assert shows(browser, "#error-zip", "../../evil.sh")
    screenshot(browser, "submit-refused")

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mlcube.yaml", b"name: bomb\n")
        with z.open("zeros.bin", "w") as f:
            for _ in range(300):
                f.write(bytes(1024 * 1024))
    assert bomb.stat().st_size < 2 * 1024 * 1024
    submit(browser, base, zip_path=bomb, tasks="greet", host="lab1")
    assert shows(browser, "#error-zip", "ZIP bomb")
    assert not list((cube_home / "ui" / "sources").glob("*/*/zeros.bin"))


def test_submit_shows_the_clis_own_errors_beside_each_field(browser, ui_server, tmp_path):
    copy_cube(HELLO, tmp_path / "cubes", keep=("names.yaml",))
    base = ui_server(cubes_dir=tmp_path / "cubes")
    submit(browser, base, cube="hello", tasks="greet,bogus", host="@nogroup")
    assert shows(browser, "#error-tasks", "has no task 'bogus'")
    assert shows(browser, "#error-host", "No host matched")
    screenshot(browser, "submit")


def test_requests_without_the_token_are_refused_off_loopback(lab, browser, ui_server):
    address = non_loopback_address(lab)
    base = ui_server(bind=address, token=TOKEN)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/jobs", timeout=10)
    assert refused.value.code == 401
    bearer = urllib.request.Request(base + "/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert urllib.request.urlopen(bearer, timeout=10).status == 200

    browser.delete_all_cookies()
    browser.get(base + "/hosts")
    assert "Unauthorized" in text(browser, "body")
    browser.get(f"{base}/jobs?token={TOKEN}")
    assert browser.current_url == base + "/jobs" and text(browser, "h1") == "Jobs"
    cookie = browser.get_cookie("cube_token")
    assert cookie and cookie["httpOnly"] and "cube_token" not in browser.execute_script(
        "return document.cookie")
    browser.get(base + "/submit")
    assert text(browser, "h1") == "Submit a job"


def non_loopback_address(lab) -> str:
    """The controller's end of a lab host's veth (10.203.X.1), else any local non-127 one."""
    if lab.netns:
        return lab.hosts[0].address.rsplit(".", 1)[0] + ".1"
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout.split()
    for word in out:
        if "/" in word:
            address = word.split("/")[0]
            if not ipaddress.ip_address(address).is_loopback:
                return address
    pytest.fail("no non-loopback IPv4 address on this machine")
