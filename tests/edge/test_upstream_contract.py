"""What ``edge/upstream.py`` relies on in Tornado's private client internals, pinned.

``_KeepAliveConnection`` subclasses ``tornado.simple_httpclient._HTTPConnection`` (Tornado has no
public hook to keep a connection or to cancel a request), and ``_alive`` reads an IOStream's
``_read_buffer_size``. pyproject.toml pins Tornado to the minor release these were checked
against; this test fails when an upgrade changes any of them, so that the upgrade is made on
purpose: read the new Tornado's ``simple_httpclient.py``, check ``edge/upstream.py`` against it,
run ``tests/edge/test_keepalive.py``, then update the digests below.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from pathlib import Path

import tornado
from tornado import iostream, simple_httpclient
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection

# Every private method upstream.py overrides or calls.
METHODS = (
    "__init__",
    "run",
    "_create_connection",
    "_handle_exception",
    "_on_end_request",
    "finish",
    "headers_received",
    "_release",
)
DIGEST = "a641eac9221f4f25"  # sha256 of the methods' source, first 16 hex digits, Tornado 6.6
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _digest() -> str:
    source = "".join(inspect.getsource(getattr(_HTTPConnection, name)) for name in METHODS)
    source += inspect.getsource(SimpleAsyncHTTPClient._connection_class)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_tornado_is_pinned_to_the_checked_minor_release() -> None:
    [pin] = re.findall(r'"tornado([^"]*)"', PYPROJECT.read_text())
    assert pin == ">=6.6,<6.7"
    assert tornado.version.startswith("6.6.")


def test_the_private_methods_upstream_relies_on_are_unchanged() -> None:
    assert _digest() == DIGEST, (
        f"Tornado {tornado.version} changed the private client internals edge/upstream.py "
        "subclasses: see this module's docstring"
    )


def test_the_private_names_and_signatures_are_there() -> None:
    for name in METHODS:
        assert callable(getattr(_HTTPConnection, name)), name
    assert list(inspect.signature(_HTTPConnection.__init__).parameters) == [
        "self", "client", "request", "release_callback", "final_callback", "max_buffer_size",
        "tcp_client", "max_header_size", "max_body_size",
    ]  # fmt: skip
    assert list(inspect.signature(_HTTPConnection._handle_exception).parameters) == [
        "self", "typ", "value", "tb",
    ]  # fmt: skip
    # The client makes its connections through the overridable factory ...
    assert "self._connection_class()(" in inspect.getsource(SimpleAsyncHTTPClient)
    assert "self.tcp_client = TCPClient(" in inspect.getsource(SimpleAsyncHTTPClient.initialize)
    # ... a finished response ends in _on_end_request (which upstream.py turns into pooling),
    run = inspect.getsource(_HTTPConnection.run)
    assert "self._on_end_request()" in inspect.getsource(_HTTPConnection.finish)
    # ... the stream goes through _create_connection, and a connect completing after a cancel
    # (a cleared final callback) closes its stream.
    assert "self._create_connection(stream)" in run
    assert "if self.final_callback is None" in run
    # _alive reads how many bytes an idle stream holds unread.
    assert "self._read_buffer_size" in inspect.getsource(iostream.BaseIOStream.__init__)
    assert simple_httpclient._HTTPConnection is _HTTPConnection
