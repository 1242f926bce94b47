"""The HTTP side of gblk's metrics: ``/metrics`` and ``/healthz`` on gevent's WSGI server.

``MetricsServer`` listens on one address (``HOST:PORT`` or ``[V6]:PORT``) and
serves, each request in its own greenlet from a small pool:

- ``GET /metrics``: the registry, in the classic text format (0.0.4) unless the
  Accept header asks for OpenMetrics; gzip when accepted; ``name[]`` filters.
  The encoders are prometheus_client's own. With a ``GblkRegistry`` the hub only
  snapshots the stats (``prepare_scrape``); collecting, encoding and compressing
  run in the server's own worker thread, so a scrape of a host with a hundred
  disks (some 10k samples, 100+ ms of Python) does not stall the dataplane.
  Other registries are encoded on the hub.
- ``GET /healthz``: ``200 ok`` or ``503 <reason>`` from the ``health`` callable.
- anything else: 404.

What it must not do: touch the dataplane (it only reads the registry, which
reads the stats), block the hub (a scrape is CPU work on the hub, no IO but the
socket), monkey-patch, or log per request (the access log is off; server errors
go to the ``gblk.metrics`` logger).
"""

from __future__ import annotations

import errno
import logging
import socket as _stdsocket
import gzip
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

import gevent.pool
import gevent.socket
import gevent.threadpool
from gevent.pywsgi import WSGIServer
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from gblk.errors import ConfigError

log = logging.getLogger("gblk.metrics")

#: where ``--metrics-address`` listens unless told otherwise: loopback only, so
#: the endpoint is not exposed to the network by accident
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9741"

HealthCheck = Callable[[], Tuple[bool, str]]
_StartResponse = Callable[..., Any]

_TEXT = "text/plain; charset=utf-8"


def parse_address(address: str) -> Tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6ADDR]:PORT"`` -> (host, port). Port 0 picks a free port.

    Raises ConfigError naming ``metrics-address`` and the accepted forms.
    """
    hint = "expected HOST:PORT or [IPV6]:PORT (e.g. 127.0.0.1:9741, [::1]:9741)"
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"metrics-address {address!r}: {hint}")
    address = address.strip()
    if address.startswith("["):
        close = address.find("]")
        if close < 0 or address[close + 1:close + 2] != ":":
            raise ConfigError(f"metrics-address {address!r}: {hint}")
        host, port_s = address[1:close], address[close + 2:]
        if ":" not in host:
            raise ConfigError(f"metrics-address {address!r}: brackets are for IPv6 addresses; {hint}")
    else:
        host, sep, port_s = address.rpartition(":")
        if not sep:
            raise ConfigError(f"metrics-address {address!r}: no port; {hint}")
        if ":" in host:
            raise ConfigError(f"metrics-address {address!r}: put an IPv6 address in brackets; {hint}")
    if not host:
        raise ConfigError(
            f"metrics-address {address!r}: no host; use 0.0.0.0:PORT or [::]:PORT to listen on every "
            f"interface, 127.0.0.1:PORT for loopback only")
    if any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(f"metrics-address {address!r}: bad host {host!r}; {hint}")
    if not port_s.isdigit():
        raise ConfigError(f"metrics-address {address!r}: port {port_s!r} is not a number; {hint}")
    port = int(port_s)
    if port > 65535:
        raise ConfigError(f"metrics-address {address!r}: port {port} is out of range 0..65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of parse_address (brackets around IPv6 hosts)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP. ``start()``/``stop()`` are idempotent."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        health: HealthCheck,
        *,
        max_connections: int = 8,
        stop_timeout: float = 1.0,
    ) -> None:
        self._host, self._port = parse_address(address)
        self._address = address
        self._registry = registry
        self._health = health
        self._max_connections = max_connections
        self._stop_timeout = stop_timeout
        self._server: Optional[WSGIServer] = None
        self._pool: Optional[gevent.threadpool.ThreadPool] = None
        self._bound: Optional[Tuple[str, int]] = None

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in the background. Bind failures raise ConfigError."""
        if self._server is not None:
            return
        listener = self._listen()
        pool = gevent.threadpool.ThreadPool(1)  # the scrapes' encoding, off the hub
        try:
            server = WSGIServer(
                listener,
                self._app,
                spawn=gevent.pool.Pool(self._max_connections),
                log=None,
                error_log=log,
            )
            server.start()
        except BaseException:
            listener.close()
            pool.kill()
            raise
        sockname = listener.getsockname()
        self._bound = (str(sockname[0]), int(sockname[1]))
        self._server = server
        self._pool = pool
        log.info("metrics: serving on http://%s/metrics", format_address(*self._bound))

    def stop(self) -> None:
        """Stop listening, give open requests ``stop_timeout`` to finish, kill the rest."""
        server, self._server = self._server, None
        pool, self._pool = self._pool, None
        try:
            if server is not None:
                server.stop(timeout=self._stop_timeout)
        finally:
            self._bound = None
            if pool is not None:
                pool.kill()

    def _listen(self) -> Any:
        try:
            infos = gevent.socket.getaddrinfo(
                self._host, self._port, 0, _stdsocket.SOCK_STREAM, 0, _stdsocket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"metrics-address {self._address!r}: cannot resolve {self._host!r}: {exc}") from exc
        family, socktype, proto, _, sockaddr = infos[0]
        sock = gevent.socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            what = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigError(f"metrics-address {self._address!r}: cannot listen: {what}") from exc
        return sock

    # ---- introspection ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) actually bound; only while running (port 0 is resolved here)."""
        if self._bound is None:
            raise RuntimeError("MetricsServer is not running")
        return self._bound

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server (for logs, tests, ``gblk demo``)."""
        return "http://" + format_address(*self.address)

    # ---- WSGI ----------------------------------------------------------------

    def _app(self, environ: Dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            return self._healthz(environ, start_response)
        return _reply(start_response, "404 Not Found", b"not found: try /metrics or /healthz\n")

    def _metrics(self, environ: Dict[str, Any], start_response: _StartResponse) -> List[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"use GET\n", [("Allow", "GET, HEAD")])
        accept = environ.get("HTTP_ACCEPT") or ""
        gzip_ok = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or "")
        names = parse_qs(environ.get("QUERY_STRING") or "").get("name[]")
        prepare: Optional[Callable[[], ContextManager[None]]] = getattr(self._registry, "prepare_scrape", None)
        pool = self._pool
        if prepare is None or pool is None:
            body, ctype = _encode(self._registry, accept, names)
        else:
            pin = prepare()  # here, on the hub: a copy of the stats
            body, ctype = pool.apply(_encode_pinned, (pin, self._registry, accept, names))
        headers = [("Content-Type", ctype)]
        if gzip_ok:
            body = gzip.compress(body, compresslevel=1) if pool is None else pool.apply(gzip.compress, (body, 1))
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [b"" if method == "HEAD" else body]

    def _healthz(self, environ: Dict[str, Any], start_response: _StartResponse) -> List[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"use GET\n", [("Allow", "GET, HEAD")])
        try:
            ok, reason = self._health()
        except Exception as exc:  # a broken check is itself unhealthy, and says so
            log.exception("metrics: health check raised")
            ok, reason = False, f"health check failed: {type(exc).__name__}: {exc}"
        body = (b"ok\n" if ok else (reason or "unhealthy").encode("utf-8", "replace") + b"\n")
        status = "200 OK" if ok else "503 Service Unavailable"
        return _reply(start_response, status, b"" if method == "HEAD" else body, length=len(body))


def _encode(registry: CollectorRegistry, accept: str, names: Optional[List[str]]) -> Tuple[bytes, str]:
    """The exposition the Accept header asks for (prometheus_client's content negotiation)."""
    encoder, ctype = choose_encoder(accept)
    target: Any = registry.restricted_registry(names) if names else registry
    return encoder(target), ctype


def _encode_pinned(
    pin: ContextManager[None], registry: CollectorRegistry, accept: str, names: Optional[List[str]]
) -> Tuple[bytes, str]:
    """Runs in the worker thread: collect from the snapshots, encode."""
    with pin:
        return _encode(registry, accept, names)


def _reply(
    start_response: _StartResponse,
    status: str,
    body: bytes,
    extra: Optional[List[Tuple[str, str]]] = None,
    length: Optional[int] = None,
) -> List[bytes]:
    headers = [("Content-Type", _TEXT), ("Content-Length", str(len(body) if length is None else length))]
    start_response(status, headers + (extra or []))
    return [body]
