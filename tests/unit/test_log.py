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
