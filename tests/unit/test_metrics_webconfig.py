"""The metrics web configuration: the password hash format, credential checks, and the
validation of the file that turns on TLS and basic auth (``metrics.web_config``).

Guards issue 15 item 6: a hash is a stdlib PBKDF2-SHA256 string whose format never
changes under an operator's feet (golden strings, one made by another implementation),
a wrong or malformed value is one line naming the file and the key and never shows
the value (it may be a plain password pasted in the wrong place), and the accepted
credentials are remembered without PBKDF2 on every scrape. The TLS files themselves
are checked with real certificates in tests/integration/test_metrics_tls.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest

from gblk.config import LIVE_KEYS, load_config
from gblk.errors import ConfigError
from gblk.metrics.passwords import (
    DEFAULT_ITERATIONS,
    BadHash,
    PasswordHash,
    ab64_decode,
    ab64_encode,
    hash_password,
)
from gblk.metrics.webconfig import BasicAuth, load_web_config

#: made by gblk's hash_password("correct horse battery staple", 10000, b"gblk-salt-16byte")
#: and, byte for byte the same, by passlib 1.7.4's pbkdf2_sha256.using(rounds=10000, salt=...)
GOLDEN = "$pbkdf2-sha256$10000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4"
#: passlib 1.7.4's pbkdf2_sha256.hash("secret") with its default 29000 rounds
PASSLIB = "$pbkdf2-sha256$29000$MwYgZAwBYGztXYtxrrV2Lg$XQi0OukDQMUV763ZgSf434ECd0ypahU0vPSb0SHyXIs"

FAST = 10_000  # the fewest iterations gblk accepts: quick tests


# --- the hash format -------------------------------------------------------------------


def test_hash_format_is_golden() -> None:
    """A fixed password, salt and count give exactly the documented string: hashes in an
    operator's web configuration keep working across gblk versions."""
    assert hash_password("correct horse battery staple", FAST, b"gblk-salt-16byte") == GOLDEN
    parsed = PasswordHash.parse(GOLDEN)
    assert parsed.iterations == FAST and parsed.salt == b"gblk-salt-16byte"
    assert len(parsed.checksum) == 32 and str(parsed) == GOLDEN


def test_hashes_from_passlib_check() -> None:
    """The format is passlib's pbkdf2_sha256 (modular crypt, adapted base64): a hash an
    operator made with passlib (or Ansible's password_hash) works as it is."""
    h = PasswordHash.parse(PASSLIB)
    assert h.verify("secret")
    assert not h.verify("Secret") and not h.verify("secret ") and not h.verify("")


def test_hash_password_salts_and_verifies() -> None:
    """Two hashes of one password differ (a fresh 16-byte salt each), both verify, a
    non-ASCII password is UTF-8; the default count is the documented 600000."""
    a, b = hash_password("pässword", FAST), hash_password("pässword", FAST)
    assert a != b
    for text in (a, b):
        h = PasswordHash.parse(text)
        assert len(h.salt) == 16
        assert h.verify("pässword") and not h.verify("password")
    assert DEFAULT_ITERATIONS == 600_000
    assert str(PasswordHash.parse(hash_password("x", DEFAULT_ITERATIONS))).startswith(
        "$pbkdf2-sha256$600000$")
    with pytest.raises(ValueError):
        hash_password("", FAST)
    with pytest.raises(ValueError):
        hash_password("x", 999)


def test_adapted_base64_round_trips() -> None:
    """'.' stands for '+', no padding; anything else is refused."""
    for n in range(1, 40):
        data = bytes((i * 97 + n) & 0xFF for i in range(n))
        text = ab64_encode(data)
        assert "=" not in text and "+" not in text
        assert ab64_decode(text) == data
    for bad in ("ab+c", "ab=c", "a", "ab c", "é"):
        with pytest.raises(ValueError):
            ab64_decode(bad)


MALFORMED = [
    ("hunter2", "not a password hash gblk knows"),  # a plain password, pasted in
    ("$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW", "not a password hash gblk knows"),
    ("$pbkdf2-sha512$10000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4",
     "not a password hash gblk knows"),
    ("pbkdf2-sha256$10000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4",
     "not a password hash gblk knows"),
    ("$pbkdf2-sha256$1e4$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4",
     "bad iteration count"),
    ("$pbkdf2-sha256$010000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4",
     "bad iteration count"),
    ("$pbkdf2-sha256$1000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4",
     "1000 iterations; allowed: 10000 to 10000000"),
    ("$pbkdf2-sha256$99999999$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4",
     "allowed: 10000 to 10000000"),
    ("$pbkdf2-sha256$10000$Z2Jsay1z+WFs$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4", "not adapted base64"),
    ("$pbkdf2-sha256$10000$Z2Jsay1z$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4", "salt of 6 bytes"),
    ("$pbkdf2-sha256$10000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT", "hash of 9 bytes"),
    ("$pbkdf2-sha256$10000$Z2Jsay1zYWx0LTE2Ynl0ZQ$WABtypotDzBT/T.dU0TgD50BmHzlptmPvwvlYoQ1qj4$x",
     "not a password hash gblk knows"),
]


@pytest.mark.parametrize("text,fragment", MALFORMED)
def test_malformed_hashes_are_refused_without_echoing_them(text: str, fragment: str) -> None:
    """Every malformed hash says what is wrong and how to make a good one, and never
    repeats the value."""
    with pytest.raises(BadHash) as info:
        PasswordHash.parse(text)
    message = str(info.value)
    assert fragment in message
    for part in text.split("$"):
        if len(part) >= 6 and not part.isdigit() and not part.startswith("pbkdf2"):
            assert part not in message


def test_a_hash_does_not_show_itself_in_repr() -> None:
    """A hash is worth guessing offline: repr (logs, tracebacks) shows only the count."""
    assert repr(PasswordHash.parse(GOLDEN)) == "PasswordHash(iterations=10000)"


# --- basic auth ------------------------------------------------------------------------


class _Runs:
    """A ``run`` that counts the slow calls (PBKDF2) it is asked to make."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, func: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
        self.calls += 1
        return func(*args)


def test_basic_auth_remembers_only_accepted_credentials() -> None:
    """The right password costs PBKDF2 once, then nothing; a wrong one costs it every
    time (never remembered); an unknown user costs the same as a wrong password."""
    auth = BasicAuth({"prometheus": PasswordHash.parse(hash_password("s3cret", FAST))})
    runs = _Runs()
    assert auth.check("prometheus", "s3cret", runs) and runs.calls == 1
    assert auth.check("prometheus", "s3cret", runs) and runs.calls == 1
    for _ in range(2):
        assert not auth.check("prometheus", "s3cre", runs)
    assert runs.calls == 3
    assert not auth.check("grafana", "s3cret", runs) and runs.calls == 4
    assert not auth.check("prometheus\0s3cret", "", runs)
    assert auth.users == ("prometheus",)
    assert "s3cret" not in repr(auth) and "pbkdf2" not in repr(auth)


# --- the web configuration file --------------------------------------------------------


def _web(tmp_path: Path, text: str) -> str:
    path = tmp_path / "web.toml"
    path.write_text(text)
    return str(path)


def _error(tmp_path: Path, text: str) -> str:
    path = _web(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    assert "\n" not in message, "a configuration error must be one line"
    assert message.startswith(path), message
    return message


WEB_ERRORS: List[Tuple[str, str]] = [
    ("[tls_server_config\n", "not valid TOML"),
    ("[tls_config]\ncert_file = 'a'\n", "unknown key tls_config; a web configuration allows: "
                                        "[tls_server_config], [basic_auth_users]"),
    ("http_server_config = 1\n", "unknown key http_server_config"),
    ("tls_server_config = 'x'\n", "tls_server_config must be a table"),
    ("[tls_server_config]\ncert_file = 'a'\nkey_file = 'b'\ncertfile = 'c'\n",
     "unknown key tls_server_config.certfile; [tls_server_config] allows: cert_file, key_file, "
     "client_ca_file, client_auth_type, min_version"),
    ("[tls_server_config]\ncert_file = 'a'\n", "tls_server_config.key_file is missing"),
    ("[tls_server_config]\nkey_file = 'a'\n", "tls_server_config.cert_file is missing"),
    ("[tls_server_config]\ncert_file = 3\nkey_file = 'b'\n", "tls_server_config.cert_file must be a non-empty string"),
    ("[tls_server_config]\ncert_file = 'a'\nkey_file = 'b'\nmin_version = 'TLS11'\n",
     "min_version must be 'TLS12' or 'TLS13'"),
    ("[tls_server_config]\ncert_file = 'a'\nkey_file = 'b'\nclient_auth_type = 'Yes'\n",
     "client_auth_type must be one of 'NoClientCert', 'VerifyClientCertIfGiven', "
     "'RequireAndVerifyClientCert'"),
    ("[tls_server_config]\ncert_file = 'a'\nkey_file = 'b'\nclient_auth_type = 'RequireAnyClientCert'\n",
     "'RequireAnyClientCert' is not offered"),
    ("[tls_server_config]\ncert_file = 'a'\nkey_file = 'b'\nclient_auth_type = 'RequireAndVerifyClientCert'\n",
     "needs client_ca_file"),
    ("[tls_server_config]\ncert_file = 'a'\nkey_file = 'b'\nclient_ca_file = 'c'\n"
     "client_auth_type = 'NoClientCert'\n", "asks for no client certificate"),
    ("[tls_server_config]\ncert_file = 'nope.crt'\nkey_file = 'nope.key'\n",
     "tls_server_config.cert_file {dir}/nope.crt: no such file"),
    ("[basic_auth_users]\n", "[basic_auth_users] is empty"),
    ("[basic_auth_users]\nprometheus = 'hunter2'\n",
     "basic_auth_users.prometheus is not a password hash gblk knows: expected "
     "$pbkdf2-sha256$ITERATIONS$SALT$HASH (make one with gblk hash-password)"),
    ("[basic_auth_users]\nprometheus = 12\n", "basic_auth_users.prometheus must be a string"),
    ("[basic_auth_users.prometheus]\npassword = 'x'\n", "basic_auth_users.prometheus must be a password hash string"),
    (f"[basic_auth_users]\n'a:b' = '{GOLDEN}'\n", "user name 'a:b' cannot be sent in basic auth"),
    (f"[basic_auth_users]\n'' = '{GOLDEN}'\n", "user name '' cannot be sent"),
]


@pytest.mark.parametrize("text,fragment", WEB_ERRORS)
def test_bad_web_configuration_is_one_line_naming_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    """Unknown keys, missing keys, bad values and malformed hashes: one line that names
    the file and the key and says what is allowed (as gblk.toml's errors do)."""
    assert fragment.format(dir=tmp_path) in _error(tmp_path, text)


def test_a_plain_password_in_the_file_is_not_repeated(tmp_path: Path) -> None:
    """Someone wrote the password itself where its hash belongs: the error (which goes to
    the journal) must not carry it."""
    message = _error(tmp_path, "[basic_auth_users]\nprometheus = 'Tr0ub4dor&3-very-secret'\n")
    assert "Tr0ub4dor" not in message and "gblk hash-password" in message


def test_missing_unreadable_and_directory_web_config(tmp_path: Path) -> None:
    """The file named by metrics.web_config must exist and be a readable file."""
    for path, fragment in ((tmp_path / "absent.toml", "no such file"), (tmp_path, "is a directory")):
        with pytest.raises(ConfigError, match=fragment) as info:
            load_web_config(str(path))
        assert f"metrics.web_config {path}" in str(info.value)
    (tmp_path / "latin1.toml").write_bytes(b"# \xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_web_config(str(tmp_path / "latin1.toml"))


def test_users_only_and_empty_web_configs_load_with_warnings(tmp_path: Path) -> None:
    """Basic auth without TLS is allowed (as with exporter-toolkit) but warned about:
    passwords in the clear; an empty file is plain HTTP, warned too."""
    web = load_web_config(_web(tmp_path, f"[basic_auth_users]\nprometheus = '{GOLDEN}'\n"))
    assert web.context is None and web.scheme == "http" and web.auth is not None
    assert web.auth.users == ("prometheus",)
    assert web.describe() == "plain HTTP, basic auth (1 user)"
    assert any("in the clear" in w for w in web.warnings)
    empty = load_web_config(_web(tmp_path, ""))
    assert empty.context is None and empty.auth is None and empty.warnings
    assert empty.describe() == "plain HTTP, no authentication"
    assert GOLDEN not in repr(web)


def test_fingerprint_follows_the_contents(tmp_path: Path) -> None:
    """Same file, same fingerprint (a SIGHUP changes nothing); another hash, another one."""
    path = _web(tmp_path, f"[basic_auth_users]\nprometheus = '{GOLDEN}'\n")
    first = load_web_config(path).fingerprint
    assert load_web_config(path).fingerprint == first
    _web(tmp_path, f"[basic_auth_users]\nprometheus = '{PASSLIB}'\n")
    assert load_web_config(path).fingerprint != first


# --- the configuration key -------------------------------------------------------------


def test_web_config_key_default_override_and_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.web_config: "" (plain HTTP) by default, a path from the file or the flag
    (--web-config-file, which wins), applied on SIGHUP."""
    from gblk import config as cfgmod

    monkeypatch.setattr(cfgmod, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert load_config(None, {}).metrics.web_config == ""
    path = tmp_path / "gblk.toml"
    path.write_text("[metrics]\nweb_config = '/etc/gblk/web.toml'\n")
    assert load_config(str(path), {}).metrics.web_config == "/etc/gblk/web.toml"
    assert load_config(str(path), {"metrics.web_config": "/x.toml"}).metrics.web_config == "/x.toml"
    path.write_text("[metrics]\nweb_config = 1\n")
    with pytest.raises(ConfigError, match="metrics.web_config must be a file path"):
        load_config(str(path), {})
    assert "metrics.web_config" in LIVE_KEYS
