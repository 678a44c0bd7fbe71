"""Hub ids fail fast without a network (attnx.zoo.network): one line naming HF_HUB_OFFLINE and the
local-folder alternative within seconds, not a minute of retries."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from attnx import zoo
from attnx.errors import AttnxValueError
from attnx.zoo import network

#: a Hub nobody can reach: the name does not resolve (``.invalid`` never does, RFC 2606)
UNREACHABLE = "https://attnx-test-hub.invalid"


@pytest.mark.subprocess
def test_unreachable_hub_fails_within_seconds(tmp_path):
    """No HF_HUB_OFFLINE, no network (the endpoint does not answer), an empty cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=UNREACHABLE, HF_HOME=str(tmp_path / "hf"))
    code = ("import time\nfrom attnx import zoo\nt = time.perf_counter()\ntry:\n    zoo.load('attnx-test/no-such-model')\n"
            "except Exception as exc:\n    print(type(exc).__name__, round(time.perf_counter() - t, 1))\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    kind, seconds = proc.stdout.splitlines()[0].split()
    message = proc.stdout.splitlines()[1]
    assert kind == "AttnxValueError", proc.stdout + proc.stderr
    assert float(seconds) < network.CONNECT_TIMEOUT + 5
    assert "attnx-test/no-such-model is not in the local Hugging Face cache" in message
    assert "cannot be reached" in message and "HF_HUB_OFFLINE=1" in message and "--model ./folder" in message


def test_offline_and_not_cached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(AttnxValueError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as info:
        zoo.load("attnx-test/no-such-model")
    assert time.perf_counter() - t < 5 and "\n" not in str(info.value)


def test_the_connection_check_has_a_deadline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    t = time.perf_counter()
    assert network.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - t < 2.5


def test_local_folders_never_ask_the_network(monkeypatch, tmp_path):
    from conftest import CASES

    def no_network(*args, **kwargs):
        raise AssertionError("a local folder asked the network")

    from transformers import ViTImageProcessor

    CASES["hf_vit_sdpa"].model().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    monkeypatch.setattr(network, "hub_reachable", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert zoo.load(str(tmp_path / "vit")).kind == "image"


@pytest.mark.subprocess
def test_timm_names_fail_fast_too(tmp_path):
    """A timm name's pretrained weights come from the Hub as well: the same check, the same line
    (timm imported before the clock starts: its import alone takes seconds on a loaded machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=UNREACHABLE, HF_HOME=str(tmp_path / "hf"))
    code = ("import time, timm\nfrom attnx import zoo\nt = time.perf_counter()\ntry:\n    zoo.load('timm:test_vit')\n"
            "except Exception as exc:\n    print(type(exc).__name__, round(time.perf_counter() - t, 1))\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    kind, seconds = proc.stdout.splitlines()[0].split()
    assert kind == "AttnxValueError", proc.stdout + proc.stderr
    assert float(seconds) < network.CONNECT_TIMEOUT + 5
    assert "timm/test_vit.r160_in1k is not in the local Hugging Face cache" in proc.stdout
