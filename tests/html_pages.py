"""Reading attnx's HTML pages in tests: the JSON data each view embeds."""
from __future__ import annotations

import json
import re

DATA = re.compile(r'<script type="application/json" class="attnx-data">(.*?)</script>', re.S)


def page_data(page: str) -> list[dict]:
    """The data of every view of ``page``, in order."""
    return [json.loads(m) for m in DATA.findall(page)]
