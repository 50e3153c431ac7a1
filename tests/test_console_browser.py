"""The console in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Signs in through the form, checks that each page shows the numbers the admin API returns for a
seeded log, creates and revokes a key, promotes and rolls back a trial, checks that a team's key
sees only its team and that attacker-controlled log text is shown, never run; and saves a
screenshot of every page under ``$KAIYUAN_TEST_OUTPUT/console`` (default ``test-output/console``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.console_seed import TEAMS
from tests.console_env import MASTER, TRIAL, Console, start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)
OUT = Path(os.environ.get("KAIYUAN_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output")) / "console"

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - selenium is a dev dependency
    pytestmark = pytest.mark.skip(reason="needs selenium (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                "--disable-extensions", "--no-first-run", "--lang=en-US"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def console(make_gateway: Any, fake_openai: Any, browser: WebDriver) -> Console:
    browser.delete_all_cookies()
    return start(make_gateway, fake_openai.url)


def wait(driver: WebDriver, cond: Callable[[WebDriver], Any], timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout).until(cond)


def sign_in(driver: WebDriver, c: Console, key: str = MASTER, then: str = "/ui/overview") -> None:
    driver.get(f"{c.url}/ui/login?next={then}")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    wait(driver, lambda d: d.find_elements(By.ID, "who"))
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def shot(driver: WebDriver, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(OUT / f"{name}.png"))


def cell(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text).strip()


def money(v: float) -> str:
    return f"${v:,.4f}"


def test_pages_show_the_api_numbers(browser: WebDriver, console: Console) -> None:
    d = browser
    d.get(console.url + "/ui/login")
    shot(d, "0-sign-in")
    sign_in(d, console, then="/ui/overview")
    d.get(console.url + "/ui/overview?period=7d")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    ov = console.api("GET", "/admin/console/overview?period=7d")
    assert cell(d, "#totals [data-field=requests]") == f"{ov['totals']['requests']:,}"
    assert cell(d, "#totals [data-field=tokens]") == f"{ov['totals']['tokens']:,}"
    assert cell(d, "#totals [data-field=cost_usd]") == money(ov["totals"]["cost_usd"])
    assert cell(d, "#savings-usd") == money(ov["savings"]["savings_usd"])
    for dim in ("model", "vendor", "origin", "team"):
        for s in ov["shares"][dim]:
            row = d.find_element(By.CSS_SELECTOR, f"#share-{dim} tr[data-name='{s['name']}']")
            assert row.find_element(By.CSS_SELECTOR, "[data-field=requests]").text == f"{s['requests']:,}"
    assert len(d.find_elements(By.CSS_SELECTOR, ".chart canvas")) == 3  # uPlot drew the three series
    assert "Method." in d.find_element(By.ID, "savings").text
    shot(d, "1-overview")

    d.get(console.url + "/ui/traffic?period=7d")
    tr = console.api("GET", "/admin/console/traffic?period=7d")
    for r in tr["by_deployment"]:
        row = d.find_element(By.CSS_SELECTOR, f"#latency tr[data-name='{r['model']}/{r['deployment']}']")
        assert row.find_element(By.CSS_SELECTOR, "[data-field=requests]").text == f"{r['requests']:,}"
        assert row.find_element(By.CSS_SELECTOR, "[data-field=latency_p95_ms]").text == f"{r['latency_p95_ms']:,.1f}"
    for e in tr["errors_by_kind"]:
        assert d.find_element(By.CSS_SELECTOR, f"#errors tr[data-name='{e['kind']}'] [data-field=requests]").text == f"{e['requests']:,}"
    log = console.api("GET", "/admin/requests?limit=50")["data"]
    assert [r.get_attribute("data-id") for r in d.find_elements(By.CSS_SELECTOR, "#log tbody tr")] == [r["id"] for r in log]
    shot(d, "2-traffic")

    d.find_element(By.NAME, "model").send_keys("gpt-4o")
    d.find_element(By.NAME, "status").send_keys("5xx")
    d.find_element(By.ID, "search").click()
    wait(d, lambda d: "status=5xx" in d.current_url)
    want = console.api("GET", "/admin/requests?model=gpt-4o&status=5xx")["data"]
    assert [r.get_attribute("data-id") for r in d.find_elements(By.CSS_SELECTOR, "#log tbody tr")] == [r["id"] for r in want]
    d.find_element(By.CSS_SELECTOR, "#log tbody tr a").click()
    wait(d, lambda d: d.find_elements(By.ID, "request"))
    assert cell(d, "#request [data-field=status]") == str(want[0]["status"])
    shot(d, "3-request")

    d.get(console.url + "/ui/trials")
    rep = console.api("GET", f"/admin/trials/{TRIAL}")
    verdict = rep["by_candidate"][0]["verdict"]["verdict"]
    assert cell(d, f"#trials tr[data-trial='{TRIAL}'] [data-field=verdict]") == verdict
    shot(d, "4-trials")
    d.get(f"{console.url}/ui/trials/{TRIAL}")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert cell(d, "#verdict-1") == verdict
    assert cell(d, ".candidate [data-field=candidate_per_1k_usd]") == money(rep["by_candidate"][0]["cost"]["candidate_per_1k_usd"])
    assert d.find_elements(By.CSS_SELECTOR, ".candidate .chart canvas")  # the estimate-over-time chart
    shot(d, "5-trial")

    console.api("POST", "/admin/budgets", json={"scope": "team", "scope_id": TEAMS[0], "period": "month", "limit_usd": 50})
    d.get(console.url + "/ui/keys")
    kb = console.api("GET", "/admin/console/keys")
    b = next(b for b in kb["budgets"] if b["scope_id"] == TEAMS[0])
    assert cell(d, f"#budgets tr[data-scope-id='{TEAMS[0]}'] [data-field=limit_usd]") == money(b["limit_usd"])
    assert cell(d, f"#budgets tr[data-scope-id='{TEAMS[0]}'] [data-field=spent_usd]") == money(b["spent_usd"])
    shot(d, "6-keys")
    d.find_element(By.ID, "sign-out").click()
    wait(d, lambda d: "/ui/login" in d.current_url)
    d.get(console.url + "/ui/overview")
    assert "/ui/login" in d.current_url


def _accept(d: WebDriver) -> None:
    wait(d, lambda d: d.switch_to.alert).accept()


def test_create_and_revoke_a_key(browser: WebDriver, console: Console) -> None:
    d = browser
    sign_in(d, console, then="/ui/keys")
    form = d.find_element(By.ID, "create-key")
    form.find_element(By.NAME, "name").send_keys("made-in-browser")
    form.find_element(By.NAME, "allowed_models").send_keys("deepseek-chat")
    form.find_element(By.NAME, "budget_month").send_keys("12.5")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    secret = wait(d, lambda d: d.find_element(By.ID, "new-secret").get_attribute("value"))
    assert secret.startswith("sk-ky-")
    client = openai.OpenAI(base_url=console.url + "/v1", api_key=secret, max_retries=0)
    assert client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]).choices
    made = next(k for k in console.api("GET", "/admin/keys")["data"] if k["name"] == "made-in-browser")
    assert made["allowed_models"] == ["deepseek-chat"]
    assert any(b["scope_id"] == made["id"] and b["limit_usd"] == 12.5 for b in console.api("GET", "/admin/budgets")["data"])

    d.get(console.url + "/ui/keys")
    d.find_element(By.CSS_SELECTOR, f"#keys tr[data-id='{made['id']}'] button.revoke").click()
    _accept(d)
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, f"#keys tr[data-id='{made['id']}'] [data-field=status]").text == "revoked")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])


def test_promote_and_roll_back_a_trial(browser: WebDriver, console: Console) -> None:
    d = browser
    sign_in(d, console, then=f"/ui/trials/{TRIAL}")
    d.find_element(By.CSS_SELECTOR, "button.promote").click()
    _accept(d)
    wait(d, lambda d: cell(d, "#promoted-share") == "100.0%")
    live = console.api("GET", f"/admin/trials/{TRIAL}")["live"]
    assert live["promoted_share"] == 1.0
    # the promoted model now answers the incumbent's traffic
    c = openai.OpenAI(base_url=console.url + "/v1", api_key=MASTER, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "deepseek" in raw.headers["x-kaiyuan-deployment"]
    d.find_element(By.CSS_SELECTOR, "button.rollback").click()
    _accept(d)
    wait(d, lambda d: cell(d, "#promoted-share") == "0.0%")
    assert console.api("GET", f"/admin/trials/{TRIAL}")["live"]["promoted_share"] == 0.0
    history = [r["action"] for r in console.api("GET", f"/admin/trials/{TRIAL}")["routing"]]
    assert history[-2:] == ["promote", "rollback"]


def test_a_team_key_sees_only_its_team(browser: WebDriver, console: Console) -> None:
    d = browser
    sign_in(d, console, key=console.team_key)
    d.get(console.url + "/ui/overview?period=7d")
    teams = [r.get_attribute("data-name") for r in d.find_elements(By.CSS_SELECTOR, "#share-team tbody tr")]
    assert teams == [TEAMS[0]]
    mine = console.api("GET", "/admin/console/overview?period=7d", key=console.team_key)
    assert cell(d, "#totals [data-field=requests]") == f"{mine['totals']['requests']:,}"
    assert not d.find_elements(By.LINK_TEXT, "Trials")
    def teams_in_log() -> set[str]:
        return {r.find_elements(By.TAG_NAME, "td")[2].text for r in d.find_elements(By.CSS_SELECTOR, "#log tbody tr[data-id]")}

    d.get(console.url + "/ui/traffic?period=7d")
    assert teams_in_log() == {TEAMS[0]}
    d.get(console.url + f"/ui/traffic?period=7d&team_id={TEAMS[1]}")  # asking for another team widens nothing
    assert teams_in_log() <= {TEAMS[0]}
    other = console.api("GET", f"/admin/requests?team_id={TEAMS[1]}&limit=1")["data"][0]
    d.get(console.url + f"/ui/requests/{other['id']}")
    assert other["id"] not in d.find_element(By.TAG_NAME, "main").text or "no request" in d.page_source
    d.get(console.url + "/ui/keys")
    assert not d.find_elements(By.ID, "create-key")
    shot(d, "7-team-view")


def test_attacker_controlled_log_text_is_shown_not_run(browser: WebDriver, console: Console) -> None:
    from sqlalchemy import insert

    from kaiyuan.store.schema import request_log

    evil = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
    assert console.gw.gateway.engine is not None
    with console.gw.gateway.engine.begin() as conn:
        conn.execute(insert(request_log), [{
            "id": "evil-1", "ts": time.time(), "key_id": evil, "team_id": None, "dialect": "openai", "endpoint": "chat",
            "model": evil, "deployment": evil, "stream": False, "status": 502, "attempts": 1, "cancelled": False,
            "error": evil, "request_body": '{"messages": "' + evil + '"}', "response_body": evil}])
    sign_in(d := browser, console, then="/ui/traffic")
    d.get(console.url + "/ui/traffic?period=1h")
    d.get(console.url + "/ui/requests/evil-1")
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.accept()
    assert evil in d.find_element(By.ID, "response-body").text
    assert not d.find_elements(By.CSS_SELECTOR, "main img")
