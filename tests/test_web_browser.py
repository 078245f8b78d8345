"""The page set in a real browser: Debian's Chromium, headless, driven by Selenium through chromedriver.

Steps: log in; a wrong file is refused with a message on the page; upload examples/reviews.csv with
examples/sentiment.j2 and an id column; the runs page shows the run; burst workers and a burst collector finish
it while the page reloads itself; the row reads completed with every row succeeded; the CSV download link gives
the file `enqueue.py export` writes; log out, and the page's token no longer opens the runs page.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from pipeline.output.export import export_run

from .conftest import ROOT
from .webserver import make_web_fixture, web_fixture  # noqa: F401  (fixtures)

DATASET = ROOT / "examples" / "reviews.csv"
TEMPLATE = ROOT / "examples" / "sentiment.j2"


def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver. Missing: a skip on a developer's machine, a failure in CI (which installs
    the Debian packages chromium and chromium-driver in .ci/run)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        if os.environ.get("CI"):
            pytest.fail("chromium / chromedriver not installed (CI installs chromium and chromium-driver)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    session.downloads = downloads
    try:
        yield session
    finally:
        session.quit()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


READ_ROW = """
const row = document.getElementById(arguments[0]);
if (!row) return null;
const cells = {};
for (const td of row.querySelectorAll("td")) cells[td.classList[td.classList.length - 1]] = td.innerText;
for (const name of ["cancel", "resume", "retry", "download-csv"]) cells[name] = !!row.querySelector("." + name);
return cells;
"""


SUBMITTED = """
const row = document.querySelector("tr.submitted");
const message = document.getElementById("message-1");
return row && {row: row.id, message: message && message.innerText};
"""


def script(browser, source: str, *args):
    """Run a script that reads the page in one go, so that the page's own reload (every 2 s while a run is
    going) cannot come between two reads; None while the page reloads."""
    from selenium.common.exceptions import WebDriverException

    try:
        return browser.execute_script(source, *args)
    except WebDriverException:  # the document went away under the script
        return None


def read_row(browser, run_id: str) -> dict[str, str] | None:
    """The run's row as text by cell class, buttons and links by presence."""
    return script(browser, READ_ROW, f"run-{run_id}")


def test_a_person_logs_in_uploads_watches_the_run_and_downloads_the_results(web, browser, tmp_path):
    from selenium.webdriver.common.by import By

    web.add_user("dana")
    browser.get(f"{web.url}/")  # not logged in: the login page
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "username").send_keys("dana")
    browser.find_element(By.ID, "password").send_keys("correct horse battery")
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: browser.find_elements(By.ID, "user"), what="the runs page")
    assert browser.find_element(By.ID, "user").text == "dana"
    assert "No runs yet." in browser.find_element(By.ID, "runs").text

    browser.find_element(By.ID, "file").send_keys(str(TEMPLATE))  # the wrong file: refused, said on the page
    browser.find_element(By.ID, "template").send_keys("{{ review }}")
    browser.find_element(By.ID, "submit").click()
    refused = wait_for(lambda: browser.find_elements(By.ID, "message-1"), what="the refusal")[0].text
    assert refused.startswith("Not submitted: sentiment.j2: unsupported file type '.j2'"), refused
    assert web.pipeline.redis.keys("run:*") == []

    browser.find_element(By.ID, "file").send_keys(str(DATASET))
    browser.find_element(By.ID, "template").send_keys(TEMPLATE.read_text(encoding="utf-8"))
    browser.find_element(By.ID, "id_column").send_keys("id")
    browser.find_element(By.ID, "submit").click()
    shown = wait_for(lambda: script(browser, SUBMITTED), what="the submitted run's row")
    run_id = shown["row"].removeprefix("run-")
    if shown["message"] is not None:  # the flashed message, unless the page's reload came first
        assert shown["message"].startswith(f"Run {run_id}: 300 rows"), shown
    row = wait_for(lambda: read_row(browser, run_id), what="the run's row")
    assert row["total"] == "300" and row["file"] == "reviews.csv"
    assert row["status"] in ("submitted", "running") and row["cancel"]  # a going run offers cancel

    web.finish(run_id)  # burst workers and collector; the page reloads itself every 2 s meanwhile

    row = wait_for(
        lambda: (r := read_row(browser, run_id)) and r["status"] == "completed" and r,
        what="the run to show as completed",
    )  # a final run's page no longer reloads
    assert row["succeeded"] == "300" and row["failed"] == "0" and row["pending"] == "0"
    assert float(row["cost"]) > 0 and row["eta"] == "0 s"
    assert row["resume"] and not row["cancel"] and not row["retry"]

    browser.find_element(By.ID, f"run-{run_id}").find_element(By.CLASS_NAME, "download-csv").click()
    downloaded = wait_for(
        lambda: [p for p in browser.downloads.iterdir() if p.suffix == ".csv"], what="the CSV download"
    )[0]
    expected = tmp_path / "cli.csv"
    export_run(web.pipeline.engine, run_id, "csv", expected)
    wait_for(lambda: downloaded.stat().st_size == expected.stat().st_size, what="the download to complete")
    assert downloaded.read_bytes() == expected.read_bytes()
    assert downloaded.read_text(encoding="utf-8").count("\nrev-") == 300

    token = browser.get_cookie("access_token_cookie")["value"]
    browser.find_element(By.ID, "logout").click()
    wait_for(lambda: "/login" in browser.current_url, what="the login page after logging out")
    assert web.pipeline.redis.keys("web:revoked:*")  # the page's token is on the revocation list
    import requests

    again = requests.get(f"{web.url}/", cookies={"access_token_cookie": token}, allow_redirects=False, timeout=10)
    assert again.status_code == 302 and "/login" in again.headers["Location"]
