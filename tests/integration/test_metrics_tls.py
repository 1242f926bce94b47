"""TLS and basic auth on the metrics endpoint, through the real path.

Issue 15 item 6: hosts scraped across a network need the endpoint over HTTPS with a
password, set by a web configuration file in the manner of the Prometheus exporters'
``--web.config.file``. Certificates are made with the ``openssl`` command for each
module (``tls_support``). The tests run the exporter in this process over real TCP
and TLS (handshake failures, client certificates, TLS 1.3 only, a reload between
requests, a client that never finishes its handshake), then a real ``gblk serve``
on the simulated host serving a guest (HTTPS with the right CA and password: 200
and that guest's metrics; a wrong password: 401; plain HTTP: refused; SIGHUP picks
up a new password and keeps the old configuration when the new file is bad), bad
web configurations stopping ``gblk serve`` with exit code 2 and one line,
``gblk hash-password``, and a real Prometheus scraping the daemon with
``scheme: https``, ``tls_config`` and ``basic_auth``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import gevent
import pytest

from gblk.engine.stats import DaemonStats
from gblk.errors import ConfigError
from gblk.metrics import MetricsServer, make_registry
from gblk.metrics.passwords import PasswordHash, hash_password
from gblk.metrics.webconfig import WebConfig, load_web_config
from gblk.sim.harness.host import BackendProcess, SimHost, child_env

from .backend_support import eventually, logs_on_failure, metric, start_daemon
from .test_prometheus_server import PrometheusServer
from .tls_support import Pki, client_context, fetch, make_pki, web_toml

FAST = 10_000  # PBKDF2 iterations: the fewest gblk accepts, so tests stay quick
PASSWORD = "correct-horse-battery"
HASH = hash_password(PASSWORD, FAST)
GBLK = [sys.executable, "-m", "gblk"]
DEADLINE = 60.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _load(tmp_path: Path, text: str, name: str = "web.toml") -> WebConfig:
    path = tmp_path / name
    path.write_text(text)
    return load_web_config(str(path))


class _Health:
    answer: Tuple[bool, str] = (True, "ok")

    def __call__(self) -> Tuple[bool, str]:
        return self.answer


@pytest.fixture
def served(pki: Pki, tmp_path: Path) -> Iterator[Tuple[MetricsServer, _Health]]:
    """The exporter with TLS (the CA's server certificate) and one user."""
    web = _load(tmp_path, web_toml(pki.server_cert, pki.server_key, {"prometheus": HASH}))
    health = _Health()
    server = MetricsServer("127.0.0.1:0", make_registry(DaemonStats(xenstore_connected=True)), health, web=web)
    server.start()
    try:
        yield server, health
    finally:
        server.stop()


# --- the exporter in this process --------------------------------------------------------


def test_https_with_the_right_ca_and_password_serves_metrics(served: Tuple[MetricsServer, _Health],
                                                             pki: Pki) -> None:
    """The scraper that trusts the CA, checks the name (127.0.0.1 is in the certificate)
    and sends the password gets the metrics; HEAD too; TLS 1.2 at least."""
    server, _ = served
    assert server.url.startswith("https://127.0.0.1:")
    ctx = client_context(pki.ca)
    status, headers, body = fetch(server.url + "/metrics", ctx, "prometheus", PASSWORD)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"gblk_build_info" in body and b"process_cpu_seconds_total" in body
    status, _, body = fetch(server.url + "/metrics", ctx, "prometheus", PASSWORD, method="HEAD")
    assert status == 200 and body == b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_wrong_or_missing_credentials_get_401(served: Tuple[MetricsServer, _Health], pki: Pki,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A wrong password, an unknown user, no credentials or a malformed header: 401 with
    a Basic challenge, on /metrics and on every path but /healthz. Nothing of what the
    client sent reaches the log, even at debug level."""
    server, _ = served
    ctx = client_context(pki.ca)
    caplog.set_level(logging.DEBUG, logger="gblk.metrics")
    for user, password in (("prometheus", "wrong-horse"), ("grafana", PASSWORD), ("prometheus", ""),
                           (None, None)):
        for path in ("/metrics", "/", "/nope"):
            status, headers, body = fetch(server.url + path, ctx, user, password)
            assert status == 401 and body == b"unauthorized\n", (user, path)
            assert headers["www-authenticate"] == 'Basic realm="gblk", charset="UTF-8"'
    for header in ("Bearer abc", "Basic !!!", "Basic " + "cHJvbWV0aGV1cw=="):  # the last: no colon

        def call(header: str = header) -> int:
            import http.client

            conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
            try:
                conn.request("GET", "/metrics", headers={"Authorization": header})
                return conn.getresponse().status
            finally:
                conn.close()

        assert gevent.get_hub().threadpool.apply(call) == 401
    assert fetch(server.url + "/metrics", ctx, "prometheus", PASSWORD)[0] == 200
    logged = caplog.text
    assert "wrong-horse" not in logged and PASSWORD not in logged and "grafana" not in logged
    assert "credentials from 127.0.0.1" in logged


def test_plain_http_and_an_untrusted_certificate_fail(served: Tuple[MetricsServer, _Health], pki: Pki) -> None:
    """Plain HTTP to the HTTPS endpoint gets no answer, a client that trusts another CA
    refuses the certificate, and the endpoint keeps serving the right clients."""
    server, _ = served
    with pytest.raises(OSError):
        fetch(server.url.replace("https://", "http://") + "/metrics", None, "prometheus", PASSWORD)
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(server.url + "/metrics", client_context(pki.other_ca), "prometheus", PASSWORD)
    assert fetch(server.url + "/metrics", client_context(pki.ca), "prometheus", PASSWORD)[0] == 200


def test_healthz_is_open_and_says_why_only_to_users(served: Tuple[MetricsServer, _Health], pki: Pki) -> None:
    """/healthz asks for no credentials (probes need the status code); when unhealthy it
    says only "unhealthy" to an anonymous client and the reason to a user."""
    server, health = served
    ctx = client_context(pki.ca)
    assert fetch(server.url + "/healthz", ctx)[0::2] == (200, b"ok\n")
    health.answer = (False, "d5/qdisk/51712 stuck in Closing for 75s")
    assert fetch(server.url + "/healthz", ctx)[0::2] == (503, b"unhealthy\n")
    assert fetch(server.url + "/healthz", ctx, "prometheus", "wrong")[0::2] == (503, b"unhealthy\n")
    assert fetch(server.url + "/healthz", ctx, "prometheus", PASSWORD)[0::2] == (
        503, b"d5/qdisk/51712 stuck in Closing for 75s\n")


def test_a_stalled_handshake_does_not_block_scrapes(served: Tuple[MetricsServer, _Health], pki: Pki) -> None:
    """A client that connects and never speaks TLS holds one connection slot, not the
    server: the handshake runs in the connection's own greenlet."""
    server, _ = served
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        assert fetch(server.url + "/metrics", client_context(pki.ca), "prometheus", PASSWORD)[0] == 200
    finally:
        for s in silent:
            s.close()


def _serve(web: WebConfig) -> MetricsServer:
    server = MetricsServer("127.0.0.1:0", make_registry(DaemonStats(), process=False), lambda: (True, "ok"),
                           web=web)
    server.start()
    return server


def test_client_certificates(pki: Pki, tmp_path: Path) -> None:
    """With client_ca_file, a scraper without a certificate from that CA is refused in the
    handshake (RequireAndVerifyClientCert, the default then); VerifyClientCertIfGiven
    lets it in without one, and still refuses a certificate from another CA."""
    required = _load(tmp_path, web_toml(pki.server_cert, pki.server_key, client_ca_file=str(pki.ca)))
    assert required.tls is not None and required.tls.client_auth_type == "RequireAndVerifyClientCert"
    server = _serve(required)
    try:
        url = server.url + "/metrics"
        assert fetch(url, client_context(pki.ca, pki.client_cert, pki.client_key))[0] == 200
        with pytest.raises(OSError):
            fetch(url, client_context(pki.ca))
        with pytest.raises(OSError):  # the server's own certificate: not a client certificate
            fetch(url, client_context(pki.ca, pki.self_signed_cert, pki.self_signed_key))
    finally:
        server.stop()
    optional = _load(tmp_path, web_toml(pki.server_cert, pki.server_key, client_ca_file=str(pki.ca),
                                        client_auth_type="VerifyClientCertIfGiven"))
    server = _serve(optional)
    try:
        url = server.url + "/metrics"
        assert fetch(url, client_context(pki.ca))[0] == 200
        assert fetch(url, client_context(pki.ca, pki.client_cert, pki.client_key))[0] == 200
        with pytest.raises(OSError):
            fetch(url, client_context(pki.ca, pki.self_signed_cert, pki.self_signed_key))
    finally:
        server.stop()


def test_min_version_tls13_refuses_tls12_clients(pki: Pki, tmp_path: Path) -> None:
    """min_version = "TLS13": a client capped at TLS 1.2 fails the handshake."""
    server = _serve(_load(tmp_path, web_toml(pki.server_cert, pki.server_key, min_version="TLS13")))
    try:
        old = client_context(pki.ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(OSError):
            fetch(server.url + "/metrics", old)
        assert fetch(server.url + "/metrics", client_context(pki.ca))[0] == 200
    finally:
        server.stop()


def test_set_web_config_applies_to_the_next_requests(pki: Pki, tmp_path: Path) -> None:
    """What SIGHUP does: a new web configuration applies to the next connection and
    request, on the same listening socket, TLS on and off included."""
    server = MetricsServer("127.0.0.1:0", make_registry(DaemonStats(), process=False), lambda: (True, "ok"))
    server.start()
    try:
        port = server.port
        assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
        server.set_web_config(_load(tmp_path, web_toml(pki.server_cert, pki.server_key, {"prometheus": HASH})))
        assert server.url == f"https://127.0.0.1:{port}"
        ctx = client_context(pki.ca)
        assert fetch(server.url + "/metrics", ctx)[0] == 401
        assert fetch(server.url + "/metrics", ctx, "prometheus", PASSWORD)[0] == 200
        other = hash_password("new-password", FAST)
        server.set_web_config(_load(tmp_path, web_toml(pki.server_cert, pki.server_key, {"prometheus": other})))
        assert fetch(server.url + "/metrics", ctx, "prometheus", PASSWORD)[0] == 401
        assert fetch(server.url + "/metrics", ctx, "prometheus", "new-password")[0] == 200
        server.set_web_config(None)
        assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        server.stop()


# --- the files a web configuration names ---------------------------------------------------


def test_tls_file_problems_are_one_line_naming_file_and_key(pki: Pki, tmp_path: Path) -> None:
    """A missing key, a file that is no certificate or no key, a key of another
    certificate, an encrypted key, a CA file with no certificate: each a ConfigError of
    one line that names the web configuration, the key and the file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    bad_cert = tmp_path / "bad.crt"
    bad_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cases = [
        (web_toml(pki.server_cert, tmp_path / "absent.key"), f"tls_server_config.key_file {tmp_path}/absent.key: no such file"),
        (web_toml(garbage, pki.server_key), f"tls_server_config.cert_file {garbage}: no PEM certificate"),
        (web_toml(pki.server_cert, garbage), f"tls_server_config.key_file {garbage}: no PEM private key"),
        (web_toml(bad_cert, pki.server_key), "tls_server_config: cannot load cert_file"),
        (web_toml(pki.server_cert, pki.client_key), f"key_file {pki.client_key} is not the key of cert_file"),
        (web_toml(pki.server_cert, pki.encrypted_key), "the key is encrypted and gblk cannot ask for its passphrase"),
        (web_toml(pki.server_cert, pki.server_key, client_ca_file=str(garbage)),
         f"tls_server_config.client_ca_file {garbage}: no usable PEM CA certificate"),
        (web_toml(pki.server_cert, pki.server_key, client_ca_file=str(tmp_path / "absent-ca.crt")),
         "client_ca_file " + str(tmp_path / "absent-ca.crt") + ": no such file"),
    ]
    for text, fragment in cases:
        path = tmp_path / "web.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_web_config(str(path))
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: "), message
        assert fragment in message, (fragment, message)


def test_relative_paths_are_relative_to_the_web_config(pki: Pki, tmp_path: Path) -> None:
    """cert_file = "server.crt" beside the web configuration file works from any
    working directory (the unit's is /)."""
    web = pki.dir / "web-relative.toml"
    web.write_text('[tls_server_config]\ncert_file = "server.crt"\nkey_file = "./server.key"\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        loaded = load_web_config(str(web))
    finally:
        os.chdir(cwd)
    assert loaded.tls is not None and loaded.tls.cert_file == str(pki.server_cert)
    assert loaded.describe() == "TLS 1.2+, no authentication"


# --- a real daemon ----------------------------------------------------------------------------


def _https_url(proc: BackendProcess) -> str:
    def url() -> str:
        m = re.search(r"serving on (https://\S+/metrics)", proc.log_text())
        if m is None and not proc.alive():
            raise AssertionError("daemon died:\n" + proc.log_text())
        return m.group(1) if m else ""

    return eventually(url, bool, "the daemon's HTTPS metrics URL", timeout=DEADLINE)


def _scrape(url: str, ctx: ssl.SSLContext, user: str, password: str) -> dict:
    status, _, body = fetch(url, ctx, user, password)
    assert status == 200, (status, body[:200])
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _sighup_until(proc: BackendProcess, text: str, count: int) -> None:
    """SIGHUP, then wait until ``text`` is in the log ``count`` times."""
    os.kill(proc.pid, signal.SIGHUP)
    eventually(lambda: proc.log_text().count(text), lambda n: n >= count, f"{text!r} x{count}",
               timeout=DEADLINE)


def test_daemon_serves_https_with_basic_auth_and_reloads_on_sighup(pki: Pki) -> None:
    """``gblk serve --web-config-file`` on the simulated host, a guest connected: HTTPS
    with the CA and the password gives that guest's metrics, a wrong password 401, plain
    HTTP nothing, gblk status the https URL. SIGHUP with a new password in the file:
    the new one works, the old one gets 401. SIGHUP with a broken file: the reload
    fails, the running configuration stays. No password reaches the log."""
    with SimHost() as host:
        web = Path(host.dir) / "web.toml"
        web.write_text(web_toml(pki.server_cert, pki.server_key, {"prometheus": HASH}))
        guest = host.create_guest(connect=False)
        daemon = start_daemon(host, "gblk", '[daemon]\nkinds = ["qdisk"]\n',
                              ["--web-config-file", str(web)])
        try:
            with logs_on_failure(daemon):
                url = _https_url(daemon)
                guest.frontend.connect()
                guest.frontend.write(0, b"\xa5" * 4096)
                ctx = client_context(pki.ca)
                samples = eventually(lambda: _scrape(url, ctx, "prometheus", PASSWORD),
                                     lambda s: metric(s, "gblk_device_connected", domain=str(guest.domid)) == 1,
                                     "the guest's disk connected, over HTTPS")
                assert metric(samples, "gblk_requests_total", domain=str(guest.domid), op="write") >= 1
                assert fetch(url, ctx, "prometheus", "wrong-horse")[0] == 401
                assert fetch(url, ctx)[0] == 401
                with pytest.raises(OSError):
                    fetch(url.replace("https://", "http://"), None, "prometheus", PASSWORD)
                status = subprocess.run(GBLK + ["status", "--json", "--control-socket", host.control_socket],
                                        capture_output=True, text=True, timeout=DEADLINE, env=_env())
                assert json.loads(status.stdout)["metrics"] == url
                log = daemon.log_text()
                assert "TLS 1.2+, basic auth (1 user)" in log

                web.write_text(web_toml(pki.server_cert, pki.server_key,
                                        {"prometheus": hash_password("staple-2", FAST)}))
                _sighup_until(daemon, "web configuration reloaded", 1)
                assert fetch(url, ctx, "prometheus", "staple-2")[0] == 200
                assert fetch(url, ctx, "prometheus", PASSWORD)[0] == 401

                web.write_text("[basic_auth_users]\nprometheus = 'staple-3'\n")  # a password, not a hash
                _sighup_until(daemon, "configuration not reloaded", 1)
                assert fetch(url, ctx, "prometheus", "staple-2")[0] == 200
                assert daemon.alive()
                log = daemon.log_text()
                for secret in (PASSWORD, "wrong-horse", "staple-2", "staple-3", HASH.split("$")[4]):
                    assert secret not in log
                assert "Traceback" not in log
                assert daemon.stop() == 0
        finally:
            daemon.stop()


def _env() -> dict:
    return child_env()


BAD_WEB_CONFIGS = [
    ("[tls_server_config]\ncert_file = '{dir}/absent.crt'\nkey_file = '{dir}/server.key'\n",
     "tls_server_config.cert_file {dir}/absent.crt: no such file"),
    ("[tls_server_config]\ncert_file = '{dir}/server.crt'\nkey_file = '{dir}/client.key'\n",
     "is not the key of cert_file"),
    ("[tls_server_config]\ncert_file = '{dir}/server.crt'\nkey_file = '{dir}/server.key'\nca_file = 'x'\n",
     "unknown key tls_server_config.ca_file"),
    ("[basic_auth_users]\nprometheus = '$pbkdf2-sha256$600000$abc'\n",
     "basic_auth_users.prometheus is not a password hash gblk knows"),
]


@pytest.mark.parametrize("text,fragment", BAD_WEB_CONFIGS)
def test_bad_web_config_stops_serve_with_exit_2(pki: Pki, tmp_path: Path, text: str, fragment: str) -> None:
    """``gblk serve`` with a bad web configuration stops before it touches Xen (here there
    is none): exit code 2 (the unit's RestartPreventExitStatus=), one line naming the
    file and the key, no traceback. ``gblk config`` (the unit's ExecReload= check) says
    the same."""
    web = tmp_path / "web.toml"
    web.write_text(text.format(dir=pki.dir))
    empty = tmp_path / "gblk.toml"
    empty.write_text("")
    for command in ("serve", "config"):
        proc = subprocess.run(GBLK + [command, "--config", str(empty), "--web-config-file", str(web)],
                              capture_output=True, text=True, timeout=DEADLINE, env=_env(),
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gblk: {web}: "), proc.stderr
        assert fragment.format(dir=pki.dir) in lines[0]
        assert "Traceback" not in proc.stderr


def test_hash_password_reads_stdin_and_prints_a_hash() -> None:
    """``gblk hash-password`` takes the password from stdin (first line), prints a hash
    that checks it, or a whole TOML line with --user; an empty password or one on the
    command line is refused."""
    def run(args: List[str], stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run(GBLK + ["hash-password", *args], input=stdin, capture_output=True, text=True,
                              timeout=DEADLINE, env=_env())

    proc = run(["--iterations", str(FAST)], "s3cret pass\n")
    assert proc.returncode == 0, proc.stderr
    h = PasswordHash.parse(proc.stdout.strip())
    assert h.iterations == FAST and h.verify("s3cret pass") and not h.verify("s3cret pass\n")
    assert "s3cret" not in proc.stdout + proc.stderr
    proc = run(["--iterations", str(FAST), "--user", "prometheus"], "pw")
    name, _, value = proc.stdout.strip().partition(" = ")
    assert name == "prometheus" and PasswordHash.parse(json.loads(value)).verify("pw")
    proc = run([], "")
    assert proc.returncode == 2 and proc.stderr.strip() == "gblk: empty password"
    proc = run(["s3cret"], "")
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    proc = run(["--iterations", "10"], "pw")
    assert proc.returncode == 2 and "--iterations must be from 10000" in proc.stderr


# --- a real Prometheus -----------------------------------------------------------------------


@pytest.mark.slow
def test_prometheus_scrapes_over_https_with_basic_auth(pki: Pki, tmp_path: Path) -> None:
    """A real Prometheus with ``scheme: https``, ``tls_config.ca_file`` (README's
    self-signed certificate, its own CA) and ``basic_auth`` scrapes a real daemon: the
    target is up and the guest's series are in its TSDB. A second job with a wrong
    password is down with Prometheus saying 401."""
    from .host_tools import require_tool

    binary = require_tool("prometheus", "prometheus")
    with SimHost() as host:
        web = Path(host.dir) / "web.toml"
        web.write_text(web_toml(pki.self_signed_cert, pki.self_signed_key, {"prometheus": HASH}))
        guest = host.create_guest(connect=False)
        daemon = start_daemon(host, "gblk", '[daemon]\nkinds = ["qdisk"]\n', ["--web-config-file", str(web)])
        prom = None
        try:
            with logs_on_failure(daemon):
                url = _https_url(daemon)
                guest.frontend.connect()
                target = url[len("https://"):-len("/metrics")]
                (tmp_path / "password").write_text(PASSWORD)
                (tmp_path / "wrong").write_text("wrong-horse")

                def job(name: str, password_file: Path) -> List[str]:
                    return [f"  - job_name: {name}",
                            "    scheme: https",
                            "    tls_config:",
                            f"      ca_file: {json.dumps(str(pki.self_signed_cert))}",
                            "    basic_auth:",
                            "      username: prometheus",
                            f"      password_file: {json.dumps(str(password_file))}",
                            "    static_configs:",
                            f"      - targets: [{json.dumps(target)}]"]

                prom = PrometheusServer(binary, tmp_path, [], [],
                                        scrape_configs=job("gblk", tmp_path / "password")
                                        + job("intruder", tmp_path / "wrong"))
                prom.start()
                prom.eventually('up{job="gblk"}', lambda r: len(r) == 1 and float(r[0]["value"][1]) == 1)
                prom.eventually(f'gblk_device_connected{{job="gblk", domain="{guest.domid}"}}',
                                lambda r: len(r) == 1 and float(r[0]["value"][1]) == 1)
                prom.eventually('up{job="intruder"}', lambda r: len(r) == 1 and float(r[0]["value"][1]) == 0)
                targets = {t["labels"]["job"]: t for t in prom.api("targets")["activeTargets"]}
                assert targets["gblk"]["health"] == "up" and targets["gblk"]["lastError"] == ""
                assert targets["gblk"]["scrapeUrl"] == url
                assert "401" in targets["intruder"]["lastError"], targets["intruder"]
        finally:
            if prom is not None:
                prom.stop()
            daemon.stop()
