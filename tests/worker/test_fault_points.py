"""Fault points: the test-only pauses a worker makes when LORAFLEET_FAULT_DELAYS asks for them."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from lorafleet.worker import fault_points


def test_parse_delays() -> None:
    assert fault_points.parse_delays("") == {}
    assert fault_points.parse_delays(" export=2 , adapter_load:slow=0.5,resume=0") == {
        "export": 2.0,
        "adapter_load:slow": 0.5,
        "resume": 0.0,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("export", "bad entry 'export'"),
        ("step=1", "bad entry 'step=1'"),
        ("adapter_load=1", "bad entry 'adapter_load=1'"),  # which adapter?
        ("export:x=1", "bad entry 'export:x=1'"),
        ("export=soon", "export needs a number of seconds, got 'soon'"),
        ("resume=-1", "resume needs a finite number of seconds >= 0"),
        ("resume=nan", "resume needs a finite number of seconds >= 0"),
    ],
)
def test_bad_delays_name_the_variable_and_entry(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=fault_points.ENV_DELAYS) as err:
        fault_points.parse_delays(text)
    assert message in str(err.value)


def test_pauses_mark_then_wait_only_where_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fault_points, "_DELAYS", {"adapter_load:slow": 0.2, "export": 0.2})
    monkeypatch.setenv(fault_points.ENV_MARK_DIR, str(tmp_path))
    started = time.monotonic()
    fault_points.pause("adapter_load:fast")  # not listed: no pause, no mark
    assert time.monotonic() - started < 0.1 and not list(tmp_path.iterdir())
    fault_points.pause("adapter_load:slow")
    assert time.monotonic() - started >= 0.2
    asyncio.run(fault_points.apause("export"))
    pid = os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"adapter_load.{pid}", f"export.{pid}"]
    assert time.monotonic() - started >= 0.4
