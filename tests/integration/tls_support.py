"""Certificates for the TLS tests, made with the ``openssl`` command (Python's ssl
cannot make them): a CA, a server certificate it signed for 127.0.0.1 and
localhost, a client certificate for mutual TLS, an unrelated CA, and the
self-signed certificate README's recipe makes. Skipped (a failure under CI)
without openssl, through ``require_tool``.

Also the web configuration files and the HTTPS client the tests use: the client
runs in gevent's threadpool, so the hub keeps serving an in-process exporter while
a request waits.
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import gevent

from .host_tools import require_tool

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = gblk-test
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    #: the server key, encrypted with the passphrase "x"
    encrypted_key: Path
    #: README's recipe: a self-signed certificate that is its own CA file
    self_signed_cert: Path
    self_signed_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = require_tool("openssl", "openssl")
    proc = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"openssl {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def _key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


def _ca(name: str, cwd: Path) -> None:
    _key(f"{name}.key", cwd)
    _openssl("req", "-new", "-x509", "-key", f"{name}.key", "-config", "openssl.cnf", "-extensions", "ca",
             "-subj", f"/CN={name}", "-days", "2", "-out", f"{name}.crt", cwd=cwd)


def _signed(name: str, ca: str, extensions: str, serial: int, cwd: Path) -> None:
    _key(f"{name}.key", cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-config", "openssl.cnf", "-subj", f"/CN={name}",
             "-out", f"{name}.csr", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", "2", "-extfile", "openssl.cnf", "-extensions", extensions,
             "-out", f"{name}.crt", cwd=cwd)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "openssl.cnf").write_text(_OPENSSL_CNF)
    _ca("ca", directory)
    _signed("server", "ca", "server", 2, directory)
    _signed("client", "ca", "client", 3, directory)
    _ca("other-ca", directory)
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:x", "-out", "encrypted.key",
             cwd=directory)
    # README's command, with this host's names
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", "self.key", "-out", "self.crt", cwd=directory)
    d = directory
    return Pki(dir=d, ca=d / "ca.crt", server_cert=d / "server.crt", server_key=d / "server.key",
               client_cert=d / "client.crt", client_key=d / "client.key", other_ca=d / "other-ca.crt",
               encrypted_key=d / "encrypted.key", self_signed_cert=d / "self.crt",
               self_signed_key=d / "self.key")


def web_toml(cert: Optional[Path] = None, key: Optional[Path] = None, users: Optional[Dict[str, str]] = None,
             **tls: str) -> str:
    """A web configuration file's text."""
    lines = []
    if cert is not None or key is not None or tls:
        lines.append("[tls_server_config]")
        if cert is not None:
            lines.append(f'cert_file = "{cert}"')
        if key is not None:
            lines.append(f'key_file = "{key}"')
        lines.extend(f'{k} = "{v}"' for k, v in tls.items())
    if users:
        lines.append("[basic_auth_users]")
        lines.extend(f'"{u}" = "{h}"' for u, h in users.items())
    return "\n".join(lines) + "\n"


Response = Tuple[int, Dict[str, str], bytes]


def client_context(ca: Optional[Path], cert: Optional[Path] = None, key: Optional[Path] = None) -> ssl.SSLContext:
    """What a careful scraper uses: verify the server against ``ca`` (and its name)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def fetch(url: str, context: Optional[ssl.SSLContext] = None, user: Optional[str] = None,
          password: Optional[str] = None, method: str = "GET") -> Response:
    """One request from a real thread. HTTP errors are answers; a TLS or connection
    failure raises (the caller expects it)."""
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"

    def call() -> Response:
        req = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    result: Response = gevent.get_hub().threadpool.apply(call)
    return result
