from __future__ import annotations

import json
import logging

from cri.log import JsonFormatter, TextFormatter, event


def record(msg: str, **fields) -> logging.LogRecord:
    rec = logging.LogRecord("cri.test", logging.INFO, __file__, 1, msg, None, None)
    rec.fields = fields
    return rec


def test_text_lines_are_key_value_and_quote_what_needs_it():
    line = TextFormatter().format(record("rpc done", id="abc", code="OK", ok=True, text='a "b"=c', empty=""))
    assert line.startswith("time=")
    assert ' level=info msg="rpc done" id=abc code=OK ok=true ' in line
    assert 'text="a \\"b\\"=c"' in line
    assert line.endswith('empty=""')
    assert "\n" not in TextFormatter().format(record("multi\nline"))


def test_json_lines_carry_the_fields():
    data = json.loads(JsonFormatter().format(record("rpc", id="abc", duration_ms=1.5)))
    assert data["msg"] == "rpc"
    assert data["id"] == "abc"
    assert data["duration_ms"] == 1.5
    assert data["level"] == "info"


def test_event_drops_none_fields(caplog):
    logger = logging.getLogger("cri.test")
    with caplog.at_level(logging.INFO, logger="cri.test"):
        event(logger, logging.INFO, "thing", id="x", missing=None)
    assert caplog.records[-1].fields == {"id": "x"}


def test_each_line_has_its_own_records_time_to_the_millisecond():
    # 2026-12-06T16:59:59.999Z, then the next second: the per-second cache must move on.
    first, second = record("a"), record("b")
    first.created, first.msecs = 1796576399.999, 999.0
    second.created, second.msecs = 1796576400.004, 4.0
    lines = [TextFormatter().format(r) for r in (first, second, first)]
    assert [line.split()[0] for line in lines] == [
        "time=2026-12-06T16:59:59.999Z",
        "time=2026-12-06T17:00:00.004Z",
        "time=2026-12-06T16:59:59.999Z",
    ]


def test_an_event_below_the_level_is_not_made(caplog):
    logger = logging.getLogger("cri.test")
    with caplog.at_level(logging.INFO, logger="cri.test"):
        event(logger, logging.DEBUG, "quiet", id="x")
        event(logger, logging.WARNING, "loud", id="y")
    assert [(r.getMessage(), r.levelno) for r in caplog.records] == [("loud", logging.WARNING)]
