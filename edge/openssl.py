"""The few OpenSSL calls Python's ``ssl`` module has no API for, made through ctypes.

Python 3.11 cannot set a context's list of key-exchange groups (``set_ecdh_curve`` takes one
curve), cannot turn off the server's session-id cache, and has no hook into session-ticket
decryption. All three are needed by the edge, so this module reaches the ``SSL_CTX *`` behind
an ``ssl.SSLContext`` and calls libssl directly:

* the symbols come from the ``_ssl`` extension module's own handle (``dlsym`` on it searches its
  dependencies), so they are those of the very libssl Python's contexts live in;
* the pointer is read from CPython's private ``PySSLContext`` layout (``PyObject_HEAD`` and then
  ``SSL_CTX *ctx``). That layout is checked before every use by reading three settings back
  through libssl and comparing them with what the ``ssl`` module reports; any mismatch raises
  :class:`OpenSSLUnavailable` at context creation, so an edge never starts with a setting
  silently missing.

Everything here runs once per context, except the ticket callback, which runs only for a
ClientHello that offers a session ticket.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "OpenSSLUnavailable",
    "bind_tickets_to_server_name",
    "disable_session_cache",
    "set_groups",
]

# From openssl/ssl.h (3.x); these values are part of OpenSSL's ABI.
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
_SSL_SESS_CACHE_OFF = 0
_TLSEXT_TYPE_SERVER_NAME = 0
# SSL_TICKET_STATUS and SSL_TICKET_RETURN.
_TICKET_SUCCESS = 5
_TICKET_SUCCESS_RENEW = 6
_TICKET_RETURN_IGNORE_RENEW = 2
_TICKET_RETURN_USE = 3
_TICKET_RETURN_USE_RENEW = 4


class OpenSSLUnavailable(RuntimeError):
    """libssl cannot be reached safely from this Python: a required setting cannot be made."""


_DecryptTicketFn = ctypes.CFUNCTYPE(
    ctypes.c_int,  # SSL_TICKET_RETURN
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # SSL_SESSION *
    ctypes.c_void_p,  # const unsigned char *keyname
    ctypes.c_size_t,
    ctypes.c_int,  # SSL_TICKET_STATUS
    ctypes.c_void_p,  # arg
)


class _LibSSL:
    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise OpenSSLUnavailable("needs CPython's ssl module")
        if ssl.OPENSSL_VERSION_INFO < (3, 0):
            raise OpenSSLUnavailable(f"needs OpenSSL 3, Python uses {ssl.OPENSSL_VERSION}")
        try:
            lib = ctypes.CDLL(_ssl.__file__)
        except (OSError, AttributeError) as exc:
            raise OpenSSLUnavailable(f"cannot open the _ssl module's libssl: {exc}") from exc
        self.ctrl = self._fn(lib, "SSL_CTX_ctrl", ctypes.c_long, ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_long, ctypes.c_void_p)  # fmt: skip
        self.get_options = self._fn(lib, "SSL_CTX_get_options", ctypes.c_uint64, ctypes.c_void_p)
        self.get_num_tickets = self._fn(
            lib, "SSL_CTX_get_num_tickets", ctypes.c_size_t, ctypes.c_void_p
        )
        self.set_ticket_cb = self._fn(lib, "SSL_CTX_set_session_ticket_cb", ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p, _DecryptTicketFn,
                                      ctypes.c_void_p)  # fmt: skip
        self.hello_ext = self._fn(lib, "SSL_client_hello_get0_ext", ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_size_t))  # fmt: skip
        self.session_hostname = self._fn(
            lib, "SSL_SESSION_get0_hostname", ctypes.c_char_p, ctypes.c_void_p
        )
        version = self._fn(lib, "OpenSSL_version_num", ctypes.c_ulong)()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise OpenSSLUnavailable(
                f"the libssl found ({version:#x}) is not the one ssl was built with "
                f"({ssl.OPENSSL_VERSION_NUMBER:#x})"
            )

    @staticmethod
    def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise OpenSSLUnavailable(f"libssl has no {name}") from exc
        fn.restype = restype
        fn.argtypes = argtypes
        return fn

    def ctx_pointer(self, ctx: ssl.SSLContext) -> int:
        """The ``SSL_CTX *`` of ``ctx``, verified against three settings read back."""
        if not isinstance(ctx, _ssl._SSLContext):
            raise OpenSSLUnavailable(f"not an ssl.SSLContext: {type(ctx).__name__}")
        # object.__basicsize__ is sizeof(PyObject), whatever the build's PyObject_HEAD holds.
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer or pointer % ctypes.alignment(ctypes.c_void_p):
            raise OpenSSLUnavailable("unexpected SSLContext layout: no SSL_CTX pointer")
        seen = (
            self.get_options(pointer),
            self.get_num_tickets(pointer),
            self.ctrl(pointer, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None),
        )
        expected = (int(ctx.options), ctx.num_tickets, _min_proto(ctx))
        if seen != expected:
            raise OpenSSLUnavailable(
                f"unexpected SSLContext layout: libssl reads {seen}, ssl reports {expected}"
            )
        return pointer


def _min_proto(ctx: ssl.SSLContext) -> int:
    # MINIMUM_SUPPORTED is Python's -2 sentinel; OpenSSL reports 0 ("no bound") for it.
    value = int(ctx.minimum_version)
    return 0 if value < 0 else value


_lib: _LibSSL | None = None


def _libssl() -> _LibSSL:
    global _lib
    if _lib is None:
        _lib = _LibSSL()
    return _lib


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Limit ``ctx``'s key exchange (TLS 1.3 key shares, TLS 1.2 ECDHE) to ``groups``."""
    lib = _libssl()
    pointer = lib.ctx_pointer(ctx)
    if lib.ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        raise OpenSSLUnavailable(f"OpenSSL refused the groups list {groups!r}")


def disable_session_cache(ctx: ssl.SSLContext) -> None:
    """No server-side session-id cache: resumption is by ticket only.

    Nothing would check a cached session's server name (only tickets pass through
    :func:`bind_tickets_to_server_name`), the cache is per process so a pre-forked sibling
    could not use it, and it holds every TLS 1.2 session in memory.
    """
    lib = _libssl()
    pointer = lib.ctx_pointer(ctx)
    lib.ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    if lib.ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_OFF:
        raise OpenSSLUnavailable("OpenSSL did not turn the session cache off")


def _server_name(lib: _LibSSL, ssl_ptr: int) -> bytes | None:
    """The host_name of the ClientHello being processed (RFC 6066 section 3), raw."""
    data, size = ctypes.c_void_p(), ctypes.c_size_t()
    if not lib.hello_ext(ssl_ptr, _TLSEXT_TYPE_SERVER_NAME, data, size) or not data.value:
        return None
    ext = ctypes.string_at(data.value, size.value)
    # ServerNameList: u16 length, then u8 type (0: host_name), u16 length, name.
    if len(ext) < 5 or ext[2] != 0:
        return None
    length = int.from_bytes(ext[3:5], "big")
    return ext[5 : 5 + length] if len(ext) >= 5 + length else None


def _same_name(a: bytes, b: bytes) -> bool:
    return a.lower() == b.lower()


def _decrypt_ticket(
    ssl_ptr: int | None,
    session: int | None,
    _keyname: int | None,
    _keyname_len: int,
    status: int,
    _arg: int | None,
) -> int:
    # OpenSSL decrypts a ticket before it has parsed the server_name extension, and TLS 1.3
    # "uses the SNI of the handshake" rather than the session's: without this, a ticket issued
    # for one name resumes under any other name this edge serves (RFC 6066 section 3 and
    # RFC 8446 section 4.6.1 forbid it). Ignoring the ticket makes it a full handshake.
    if status not in (_TICKET_SUCCESS, _TICKET_SUCCESS_RENEW) or not ssl_ptr or not session:
        # What OpenSSL does for these without a callback: a full handshake, with a new ticket.
        return _TICKET_RETURN_IGNORE_RENEW
    try:
        lib = _libssl()
        issued_for = lib.session_hostname(session)
        offered = _server_name(lib, ssl_ptr)
        if issued_for is None or offered is None or not _same_name(issued_for, offered):
            return _TICKET_RETURN_IGNORE_RENEW
    except Exception:
        # An exception must not escape into OpenSSL (ctypes would print it): no resumption.
        return _TICKET_RETURN_IGNORE_RENEW
    return _TICKET_RETURN_USE if status == _TICKET_SUCCESS else _TICKET_RETURN_USE_RENEW


# Kept referenced for the life of the process: OpenSSL holds a raw pointer to the thunk.
_decrypt_ticket_thunk: Callable[..., int] = _DecryptTicketFn(_decrypt_ticket)


def bind_tickets_to_server_name(ctx: ssl.SSLContext) -> None:
    """Resume a ticket only under the server name it was issued for (else a full handshake).

    Set on the context connections are accepted on: OpenSSL decrypts tickets with that
    context's keys and callback, even after the SNI callback has switched context.
    """
    lib = _libssl()
    pointer = lib.ctx_pointer(ctx)
    if lib.set_ticket_cb(pointer, None, _decrypt_ticket_thunk, None) != 1:
        raise OpenSSLUnavailable("OpenSSL refused the session-ticket callback")
