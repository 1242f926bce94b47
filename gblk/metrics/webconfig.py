"""The metrics endpoint's web configuration file: TLS and basic auth, validated once.

Modelled on the Prometheus exporters' ``--web.config.file`` (exporter-toolkit),
written in TOML like the rest of gblk's configuration::

    [tls_server_config]
    cert_file = "gblk.crt"            # PEM, the server certificate (chain)
    key_file = "gblk.key"             # PEM, its unencrypted private key
    client_ca_file = "clients.crt"    # optional: CA(s) that sign client certificates
    client_auth_type = "RequireAndVerifyClientCert"   # optional (see CLIENT_AUTH_TYPES)
    min_version = "TLS12"             # optional: "TLS12" (default) or "TLS13"

    [basic_auth_users]
    prometheus = "$pbkdf2-sha256$600000$...$..."    # gblk hash-password

Both tables are optional; an empty file means plain HTTP without authentication,
as with exporter-toolkit. Relative paths are relative to the directory of the web
configuration file.

``load_web_config(path)`` reads the file and every file it names, builds the
server's ``SSLContext`` (gevent's, so handshakes are cooperative) and returns a
:class:`WebConfig`; every problem is a :class:`gblk.errors.ConfigError` of one
line naming the file and the key. ``BasicAuth`` checks credentials and remembers
the ones it accepted (as keyed digests, never the passwords) so a scrape every
15 s does not pay for PBKDF2 each time.

What it must not do: log (the caller does), show a password or a hash in a
message, or prompt for a key's passphrase on a terminal.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from gevent import ssl as gevent_ssl

from gblk.errors import ConfigError
from gblk.metrics.passwords import DEFAULT_ITERATIONS, KEY_BYTES, BadHash, PasswordHash

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 by tox
    import tomli as tomllib

TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version")
SECTIONS = ("tls_server_config", "basic_auth_users")

#: exporter-toolkit's names -> ssl verify mode (None: not offered, see the message)
CLIENT_AUTH_TYPES: Dict[str, Optional[ssl.VerifyMode]] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    "RequestClientCert": None,
    "RequireAnyClientCert": None,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

#: the realm of the 401 answers' WWW-Authenticate header
REALM = "gblk"
#: accepted credentials remembered per configuration (a bound, not a tuning knob)
CACHE_SIZE = 64


@dataclass(frozen=True)
class TLSSettings:
    cert_file: str
    key_file: str
    client_ca_file: Optional[str] = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"

    def describe(self) -> str:
        version = "TLS 1.3" if self.min_version == "TLS13" else "TLS 1.2+"
        clients = {
            "NoClientCert": "",
            "VerifyClientCertIfGiven": ", client certificates verified if given",
            "RequireAndVerifyClientCert": ", client certificates required",
        }[self.client_auth_type]
        return f"{version}{clients}"


class BasicAuth:
    """The users of ``[basic_auth_users]`` and their hashes; checks credentials.

    ``check`` runs on the event loop; the slow part (PBKDF2) goes through the
    ``run`` it is given (the exporter's worker thread). Accepted credentials are
    remembered as HMAC digests under a key made at start, so the next scrape with
    the same password costs one HMAC; wrong ones are never remembered.
    """

    def __init__(self, users: Mapping[str, PasswordHash]) -> None:
        self._users: Dict[str, PasswordHash] = dict(users)
        self._key = os.urandom(32)
        self._accepted: Set[bytes] = set()
        # an unknown user costs as much as a known one with a wrong password
        iterations = max((h.iterations for h in self._users.values()), default=DEFAULT_ITERATIONS)
        self._nobody = PasswordHash(iterations, os.urandom(16), os.urandom(KEY_BYTES))

    @property
    def users(self) -> Tuple[str, ...]:
        return tuple(sorted(self._users))

    def check(self, user: str, password: str,
              run: Callable[[Callable[..., Any], Tuple[Any, ...]], Any]) -> bool:
        """True if ``user`` and ``password`` match. ``run(func, args)`` runs ``func(*args)``
        and returns its result (``ThreadPool.apply``)."""
        token = hmac.new(self._key, user.encode("utf-8") + b"\0" + password.encode("utf-8"),
                         hashlib.sha256).digest()
        if token in self._accepted:
            return True
        stored = self._users.get(user)
        ok = bool(run((stored or self._nobody).verify, (password,))) and stored is not None
        if ok:
            if len(self._accepted) >= CACHE_SIZE:
                self._accepted.clear()
            self._accepted.add(token)
        return ok

    def __repr__(self) -> str:
        return f"BasicAuth(users={list(self.users)!r})"


@dataclass(frozen=True)
class WebConfig:
    """A loaded web configuration. ``context`` is None for plain HTTP, ``auth`` None
    for no authentication. ``fingerprint`` digests the file and every file it names:
    equal fingerprints mean nothing changed (SIGHUP keeps the old one then)."""

    path: str
    tls: Optional[TLSSettings] = None
    context: Optional[ssl.SSLContext] = None
    auth: Optional[BasicAuth] = None
    fingerprint: bytes = b""
    warnings: Tuple[str, ...] = field(default=())

    @property
    def scheme(self) -> str:
        return "https" if self.context is not None else "http"

    def describe(self) -> str:
        """One line for the log: what the endpoint asks of a client."""
        parts = [self.tls.describe() if self.tls is not None else "plain HTTP"]
        if self.auth is not None:
            n = len(self.auth.users)
            parts.append(f"basic auth ({n} user{'s' if n != 1 else ''})")
        else:
            parts.append("no authentication")
        return ", ".join(parts)


def load_web_config(path: str) -> WebConfig:
    """Read and check the web configuration file ``path`` and the files it names."""
    where = f"{path}: "
    data = _read(path, f"metrics.web_config {path}")
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape") + b"\0" + data)
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}not UTF-8 text (TOML files are UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}not valid TOML: {exc}") from None

    for name, value in document.items():
        if name not in SECTIONS:
            raise ConfigError(f"{where}unknown key {name}; a web configuration allows: "
                              + ", ".join(f"[{s}]" for s in SECTIONS))
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{name} must be a table: [{name}]")
    tls = _tls_settings(document.get("tls_server_config"), where, os.path.dirname(os.path.abspath(path)))
    auth = _users(document.get("basic_auth_users"), where)

    warnings: List[str] = []
    context = None
    if tls is not None:
        context = _tls_context(tls, where, digest)
    if auth is not None and tls is None:
        warnings.append("basic auth over plain HTTP: passwords cross the network in the clear "
                        "(add [tls_server_config])")
    if tls is None and auth is None:
        warnings.append("the web configuration asks for neither TLS nor basic auth: plain HTTP")
    return WebConfig(path=path, tls=tls, context=context, auth=auth,
                     fingerprint=digest.digest(), warnings=tuple(warnings))


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read: {exc.strerror or exc}") from None


def _tls_settings(table: Optional[Dict[str, Any]], where: str, base: str) -> Optional[TLSSettings]:
    if table is None:
        return None
    for key, value in table.items():
        if key not in TLS_KEYS:
            raise ConfigError(f"{where}unknown key tls_server_config.{key}; [tls_server_config] "
                              f"allows: {', '.join(TLS_KEYS)}")
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(f"{where}tls_server_config.{key} must be a non-empty string")
    for key in ("cert_file", "key_file"):
        if key not in table:
            raise ConfigError(f"{where}tls_server_config.{key} is missing: TLS needs cert_file and "
                              f"key_file (PEM files)")
    ca = table.get("client_ca_file")
    auth_type = table.get("client_auth_type", "RequireAndVerifyClientCert" if ca else "NoClientCert")
    if auth_type not in CLIENT_AUTH_TYPES:
        raise ConfigError(f"{where}tls_server_config.client_auth_type must be one of "
                          + ", ".join(repr(k) for k, v in CLIENT_AUTH_TYPES.items() if v is not None)
                          + f" (got {auth_type!r})")
    if CLIENT_AUTH_TYPES[auth_type] is None:
        raise ConfigError(f"{where}tls_server_config.client_auth_type {auth_type!r} is not offered: "
                          "Python's ssl verifies every client certificate it asks for; use "
                          "'VerifyClientCertIfGiven' or 'RequireAndVerifyClientCert' with client_ca_file")
    if auth_type != "NoClientCert" and not ca:
        raise ConfigError(f"{where}tls_server_config.client_auth_type {auth_type!r} needs "
                          "client_ca_file (the CA that signs the client certificates)")
    if auth_type == "NoClientCert" and ca:
        raise ConfigError(f"{where}tls_server_config.client_ca_file is set but client_auth_type "
                          "'NoClientCert' asks for no client certificate: remove one of them")
    version = table.get("min_version", "TLS12")
    if version not in TLS_VERSIONS:
        raise ConfigError(f"{where}tls_server_config.min_version must be 'TLS12' or 'TLS13' "
                          f"(got {version!r}; TLS 1.0 and 1.1 are not offered)")

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(base, p))

    return TLSSettings(cert_file=resolve(table["cert_file"]), key_file=resolve(table["key_file"]),
                       client_ca_file=resolve(ca) if ca else None, client_auth_type=auth_type,
                       min_version=version)


def _users(table: Optional[Dict[str, Any]], where: str) -> Optional[BasicAuth]:
    if table is None:
        return None
    if not table:
        raise ConfigError(f"{where}[basic_auth_users] is empty: name at least one user "
                          "(user = \"hash\"), or leave the table out for no authentication")
    users: Dict[str, PasswordHash] = {}
    for user, value in table.items():
        if not user or ":" in user or any(ord(c) < 32 or ord(c) == 127 for c in user):
            raise ConfigError(f"{where}basic_auth_users: user name {user!r} cannot be sent in basic "
                              "auth (empty, a colon or a control character)")
        if isinstance(value, dict):
            raise ConfigError(f"{where}basic_auth_users.{user} must be a password hash string, "
                              "not a table")
        try:
            users[user] = PasswordHash.parse(value)
        except BadHash as bad:  # never the value: it may be a plain password
            raise ConfigError(f"{where}basic_auth_users.{user} {bad}") from None
    return BasicAuth(users)


def _no_passphrase() -> bytes:
    # load_cert_chain would otherwise ask on the terminal
    raise ConfigError("encrypted")


def _tls_context(tls: TLSSettings, where: str, digest: Any) -> ssl.SSLContext:
    cert = _read(tls.cert_file, f"{where}tls_server_config.cert_file {tls.cert_file}")
    key = _read(tls.key_file, f"{where}tls_server_config.key_file {tls.key_file}")
    digest.update(cert)
    digest.update(key)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ConfigError(f"{where}tls_server_config.cert_file {tls.cert_file}: no PEM certificate "
                          "in it (-----BEGIN CERTIFICATE-----)")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{where}tls_server_config.key_file {tls.key_file}: no PEM private key "
                          "in it (-----BEGIN PRIVATE KEY-----)")
    if b"ENCRYPTED" in key:
        raise ConfigError(f"{where}tls_server_config.key_file {tls.key_file}: the key is encrypted "
                          "and gblk cannot ask for its passphrase; decrypt it "
                          "(openssl pkey -in KEY -out KEY.plain) and keep it readable by root only")
    context = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except ConfigError:
        raise ConfigError(f"{where}tls_server_config.key_file {tls.key_file}: the key is encrypted "
                          "and gblk cannot ask for its passphrase; decrypt it") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{where}tls_server_config.key_file {tls.key_file} is not the key of "
                              f"cert_file {tls.cert_file}") from None
        raise ConfigError(f"{where}tls_server_config: cannot load cert_file {tls.cert_file} with "
                          f"key_file {tls.key_file}: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{where}tls_server_config: cannot read cert_file or key_file: "
                          f"{exc.strerror or exc}") from None
    verify = CLIENT_AUTH_TYPES[tls.client_auth_type]
    assert verify is not None
    if tls.client_ca_file is not None:
        ca = _read(tls.client_ca_file, f"{where}tls_server_config.client_ca_file {tls.client_ca_file}")
        digest.update(ca)
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}tls_server_config.client_ca_file {tls.client_ca_file}: no "
                              f"usable PEM CA certificate in it: {_ssl_reason(exc)}") from None
    context.verify_mode = verify
    return context


def _ssl_reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    if reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return "no certificate in it"
    if reason:
        return str(reason).replace("_", " ").lower()
    if isinstance(exc, ssl.SSLError):
        return "not a PEM certificate and key OpenSSL can read"
    return exc.strerror or str(exc)
