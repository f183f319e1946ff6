"""pipeline/logformat.py: the JSON lines carry exactly the documented fields, context included."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pipeline.logformat import ContextFilter, bind, env_format, formatter, log_context, unbind


def _logger(log_format: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"certman.test.{log_format}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_a_json_line_has_the_text_formats_fields_and_the_bound_context() -> None:
    logger, stream = _logger("json")
    with log_context(domain="a.test", order_id=7):
        logger.info("placed %s", "order", extra={"step": "place_order", "data": "secret"})
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "placed order"
    assert (first["level"], first["logger"]) == ("INFO", "certman.test.json")
    assert first["time"].endswith("+00:00")
    assert (first["domain"], first["order_id"], first["step"]) == ("a.test", 7, "place_order")
    # A library's extras are not part of the contract (they can carry task arguments).
    assert "data" not in first
    assert "domain" not in second


def test_a_traceback_is_one_field_of_one_line() -> None:
    logger, stream = _logger("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert "RuntimeError: boom" in record["exc_info"]


def test_unknown_formats_and_fields_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'xml'"):
        formatter("xml")
    with pytest.raises(ValueError, match="tenant"), log_context(tenant="x"):
        pass


def test_a_tasks_name_and_id_are_fields_too_and_bind_ends_with_unbind() -> None:
    logger, stream = _logger("json")
    token = bind(task="certman.issue.finalise", task_id="abc", domain="a.test")
    try:
        logger.info("inside")
    finally:
        unbind(token)
    logger.info("after")
    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["task"], inside["task_id"], inside["domain"]) == (
        "certman.issue.finalise",
        "abc",
        "a.test",
    )
    assert not {"task", "task_id", "domain"} & set(after)


def test_the_environment_names_the_format_and_a_bad_one_names_the_variable() -> None:
    assert env_format({}) == "text"
    assert env_format({"CERTMAN_LOG_FORMAT": " JSON "}) == "json"
    with pytest.raises(
        ValueError, match="CERTMAN_LOG_FORMAT: must be one of text, json, not 'xml'"
    ):
        env_format({"CERTMAN_LOG_FORMAT": "xml"})
