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

With a web configuration (``gblk.metrics.webconfig``) it serves HTTPS and asks
for basic auth: TLS is decided per connection and the handshake runs in the
connection's greenlet (a client that never finishes it holds a slot for
``HANDSHAKE_TIMEOUT`` at most); credentials are checked per request, the PBKDF2
part in the worker thread; ``set_web_config`` swaps the configuration for the
next connections and requests (SIGHUP). ``/healthz`` never asks for credentials
(probes and load balancers need its status code); without valid ones its 503
answer says only ``unhealthy``, not which disk is stuck. Every other path, 404
included, answers 401 to a client without valid credentials.

What it must not do: touch the dataplane (it only reads the registry, which
reads the stats), block the hub (a scrape is CPU work on the hub, no IO but the
socket), monkey-patch, or log per request (the access log is off; server errors
go to the ``gblk.metrics`` logger; failed handshakes and refused credentials are
DEBUG lines that name the client's address, never a user name or a password).
"""

from __future__ import annotations

import base64
import binascii
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
from gblk.metrics.webconfig import REALM, WebConfig

log = logging.getLogger("gblk.metrics")

#: where ``--metrics-address`` listens unless told otherwise: loopback only, so
#: the endpoint is not exposed to the network by accident
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9741"

HealthCheck = Callable[[], Tuple[bool, str]]
_StartResponse = Callable[..., Any]

_TEXT = "text/plain; charset=utf-8"

#: seconds a client may take to finish the TLS handshake
HANDSHAKE_TIMEOUT = 10.0


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
        web: Optional[WebConfig] = None,
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
        self._web = web

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in the background. Bind failures raise ConfigError."""
        if self._server is not None:
            return
        listener = self._listen()
        pool = gevent.threadpool.ThreadPool(1)  # the scrapes' encoding, off the hub
        try:
            server = _Server(
                listener,
                self._app,
                self._tls_context,
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
        log.info("metrics: serving on %s/metrics%s", self.url, self._web_note())
        self._web_warnings()

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

    # ---- web configuration -----------------------------------------------------

    @property
    def web(self) -> Optional[WebConfig]:
        return self._web

    def set_web_config(self, web: Optional[WebConfig]) -> None:
        """Use ``web`` (None: plain HTTP, no authentication) for the next connections
        and requests; connections already open keep their TLS session."""
        self._web = web
        if self.running:
            log.info("metrics: web configuration %s: serving on %s/metrics%s",
                     "reloaded" if web is not None else "removed", self.url,
                     self._web_note() if web is not None else " (plain HTTP, no authentication)")
            self._web_warnings()

    def _web_note(self) -> str:
        web = self._web
        return f" ({web.describe()}; web configuration {web.path})" if web is not None else ""

    def _web_warnings(self) -> None:
        for warning in self._web.warnings if self._web is not None else ():
            log.warning("metrics: %s", warning)

    def _tls_context(self) -> Any:
        web = self._web
        return web.context if web is not None else None

    def _authorized(self, web: Optional[WebConfig], environ: Dict[str, Any], quiet: bool = False) -> bool:
        """True without basic auth configured, or with credentials that match."""
        if web is None or web.auth is None:
            return True
        creds = _basic_credentials(environ.get("HTTP_AUTHORIZATION") or "")
        pool = self._pool
        ok = creds is not None and web.auth.check(
            creds[0], creds[1], pool.apply if pool is not None else _call)
        if not ok and not quiet:
            log.debug("metrics: %s credentials from %s", "wrong" if creds else "no",
                      environ.get("REMOTE_ADDR", "?"))
        return ok

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
    def scheme(self) -> str:
        """``https`` with TLS configured, else ``http``."""
        return self._web.scheme if self._web is not None else "http"

    @property
    def url(self) -> str:
        """``http(s)://HOST:PORT`` of the running server (for logs, tests, ``gblk demo``)."""
        return f"{self.scheme}://" + format_address(*self.address)

    # ---- WSGI ----------------------------------------------------------------

    def _app(self, environ: Dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        web = self._web  # one configuration for the whole request
        if path == "/healthz":  # open: a probe needs the status, the details need credentials
            return self._healthz(environ, start_response, self._authorized(web, environ, quiet=True))
        if not self._authorized(web, environ):
            return _reply(start_response, "401 Unauthorized", b"unauthorized\n",
                          [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])
        if path == "/metrics":
            return self._metrics(environ, start_response)
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

    def _healthz(self, environ: Dict[str, Any], start_response: _StartResponse,
                 details: bool = True) -> List[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"use GET\n", [("Allow", "GET, HEAD")])
        try:
            ok, reason = self._health()
        except Exception as exc:  # a broken check is itself unhealthy, and says so
            log.exception("metrics: health check raised")
            ok, reason = False, f"health check failed: {type(exc).__name__}: {exc}"
        if not details:
            reason = "unhealthy"
        body = (b"ok\n" if ok else (reason or "unhealthy").encode("utf-8", "replace") + b"\n")
        status = "200 OK" if ok else "503 Service Unavailable"
        return _reply(start_response, status, b"" if method == "HEAD" else body, length=len(body))


class _Server(WSGIServer):
    """gevent's WSGI server with TLS chosen per connection: ``tls()`` gives the
    ``SSLContext`` (gevent's) to use, or None for plain HTTP. A failed handshake
    (a plain HTTP client, an unknown CA, a missing client certificate) closes the
    connection with one DEBUG line; the scraper sees and reports the error."""

    def __init__(self, listener: Any, application: Any, tls: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(listener, application, **kwargs)
        self._tls = tls

    def handle(self, sock: Any, address: Any) -> None:
        context = self._tls()
        if context is None:
            super().handle(sock, address)
            return
        peer = address[0] if isinstance(address, tuple) else address
        timeout = sock.gettimeout()
        try:
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            log.debug("metrics: TLS with %s failed: %s", peer, exc)
            sock.close()
            return
        try:
            tls.settimeout(HANDSHAKE_TIMEOUT)
            tls.do_handshake()
            tls.settimeout(timeout)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.debug("metrics: TLS handshake with %s failed: %s", peer, exc)
            tls.close()
            return
        try:
            super().handle(tls, address)
        except OSError as exc:  # the client went away mid-request
            log.debug("metrics: TLS connection with %s: %s", peer, exc)
        finally:
            tls.close()


def _basic_credentials(header: str) -> Optional[Tuple[str, str]]:
    """``Basic base64(user:password)`` -> (user, password); None for anything else."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
        user, sep, password = raw.decode("utf-8").partition(":")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return (user, password) if sep else None


def _call(func: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
    return func(*args)


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
