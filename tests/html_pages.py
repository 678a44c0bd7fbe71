"""Reading attnx's HTML pages in tests: the JSON data each view embeds, and a headless browser that
has loaded them (the ``browser`` fixture is in ``conftest.py``)."""
from __future__ import annotations

import json
import re

DATA = re.compile(r'<script type="application/json" class="attnx-data">(.*?)</script>', re.S)


def page_data(page: str) -> list[dict]:
    """The data of every view of ``page``, in order."""
    return [json.loads(m) for m in DATA.findall(page)]


def open_page(driver, path) -> None:
    """Load ``path`` from disk and wait until every view has drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser"), driver.get_log("performance")  # forget earlier pages
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "const v = document.querySelectorAll('.attnx'); return v.length > 0 && [...v].every(r => r.dataset.ready === 'true')"))


def assert_clean(driver) -> None:
    """No console error, and no request but the page's own file (data URIs are inline)."""
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    # chrome:// pages are the browser's own (Chromium 150 loads its new-tab page at start), never the network
    assert urls and all(u.startswith(("file://", "data:", "chrome://", "chrome-untrusted://")) for u in urls), urls
