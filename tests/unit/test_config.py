"""gblk.config: defaults, validation with one-line errors, overrides, SIGHUP diffs."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gblk import config as cfgmod
from gblk.config import (
    LIVE_KEYS,
    BackendConfig,
    Config,
    DaemonConfig,
    MetricsConfig,
    load_config,
    parse_address,
)
from gblk.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read the machine's /etc/gblk/gblk.toml in these tests."""
    monkeypatch.setattr(cfgmod, "DEFAULT_PATH", str(tmp_path / "absent" / "gblk.toml"))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gblk.toml"
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    message = str(info.value)
    assert "\n" not in message, "a configuration error must be one line"
    return message


# --- defaults and sources -------------------------------------------------------------


def test_missing_default_file_means_all_defaults() -> None:
    """No /etc/gblk/gblk.toml is a normal installation: every key takes its default."""
    config = load_config(None, {})
    assert config.daemon == DaemonConfig()
    assert config.metrics == MetricsConfig()
    assert config.backend == BackendConfig()
    assert config.path is None


def test_default_file_is_read_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without --config, /etc/gblk/gblk.toml is used when it exists."""
    path = write(tmp_path, '[daemon]\nlog_level = "debug"\n')
    monkeypatch.setattr(cfgmod, "DEFAULT_PATH", path)
    config = load_config(None, {})
    assert config.daemon.log_level == "debug"
    assert config.path == path


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    """A file the user named with --config must exist: a typo must not silently
    run with defaults."""
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=re.escape(missing) + ".*no such configuration file"):
        load_config(missing, {})


def test_directory_instead_of_file_is_one_line(tmp_path: Path) -> None:
    """--config pointing at a directory is an error the user can act on, not a traceback."""
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path), {})


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    """A syntax error names the file and the position, on one line."""
    message = error_of(tmp_path, "[daemon\nlog_level = 1\n")
    assert "not valid TOML" in message
    assert "gblk.toml" in message


def test_defaults_agree_with_spec_table() -> None:
    """The dataclass defaults and the documented defaults are the same values."""
    assert list(cfgmod.dataclass_keys()) == [name for name, _, _ in cfgmod.keys()]
    defaults = Config()
    for name, default, _help in cfgmod.keys():
        assert defaults.get(name) == default, name


def test_example_config_documents_every_key_with_its_default() -> None:
    """systemd/gblk.toml (shipped beside the unit) lists every key at its default and
    loads cleanly: copying it to /etc changes nothing until edited."""
    example = REPO / "systemd" / "gblk.toml"
    config = load_config(str(example), {})
    assert config.as_dict() == Config().as_dict()
    text = example.read_text()
    for name, _, _ in cfgmod.keys():
        key = name.split(".", 1)[1]
        assert re.search(rf"^{key} = ", text, re.M), f"{name} missing from systemd/gblk.toml"


def test_readme_reference_documents_every_key_with_its_default() -> None:
    """README's configuration reference has a row for every key with its default."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name, default, _ in cfgmod.keys():
        assert f"`{name}`" in section, f"{name} missing from README's configuration reference"
        shown = cfgmod._toml_value(list(default) if isinstance(default, tuple) else default)
        row = next(line for line in section.splitlines() if f"`{name}`" in line)
        assert f"`{shown}`" in row, f"{name}: default {shown} not shown in README"


# --- validation: unknown keys, types, ranges ------------------------------------------


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    """A misspelt key is refused (not ignored) and the message lists what is allowed."""
    message = error_of(tmp_path, "[backend]\nmax_queue = 2\n")
    assert "unknown key backend.max_queue" in message
    assert "max_queues" in message


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    """A section gblk does not know is refused with the list of sections."""
    message = error_of(tmp_path, "[deamon]\nlog_level = 'info'\n")
    assert "[deamon]" in message and "[daemon]" in message


def test_top_level_key_is_refused(tmp_path: Path) -> None:
    """A key outside any section is an unknown section, said clearly."""
    message = error_of(tmp_path, "log_level = 'info'\n")
    assert "log_level" in message


BAD_VALUES = [
    # (section, toml value, key, expected fragment of "what is allowed")
    ("daemon", "log_level = 'loud'", "daemon.log_level", "one of 'debug', 'info'"),
    ("daemon", "log_level = 3", "daemon.log_level", "one of"),
    ("daemon", "kinds = []", "daemon.kinds", "non-empty list"),
    ("daemon", "kinds = ['qdisk', 'qdisk']", "daemon.kinds", "distinct"),
    ("daemon", "kinds = ['tap']", "daemon.kinds", "'qdisk', 'vbd', 'vbd3'"),
    ("daemon", "kinds = 'qdisk'", "daemon.kinds", "list"),
    ("daemon", "xen = 'sim:'", "daemon.xen", "'real' or 'sim:DIR'"),
    ("daemon", "xen = 'fake'", "daemon.xen", "'real' or 'sim:DIR'"),
    ("daemon", "stop_timeout = 0", "daemon.stop_timeout", "> 0"),
    ("daemon", "stop_timeout = -1.5", "daemon.stop_timeout", "> 0"),
    ("daemon", "stop_timeout = nan", "daemon.stop_timeout", "finite"),
    ("daemon", "stop_timeout = inf", "daemon.stop_timeout", "finite"),
    ("daemon", "stop_timeout = '10'", "daemon.stop_timeout", "a number"),
    ("daemon", "stop_timeout = true", "daemon.stop_timeout", "a number"),
    ("daemon", "watchdog = 1", "daemon.watchdog", "true or false"),
    ("daemon", "watchdog = 'yes'", "daemon.watchdog", "true or false"),
    ("daemon", "xenstore_timeout = 0.0", "daemon.xenstore_timeout", "> 0"),
    ("metrics", "enabled = 'no'", "metrics.enabled", "true or false"),
    ("metrics", "address = '9741'", "metrics.address", "HOST:PORT"),
    ("metrics", "address = '127.0.0.1:99999'", "metrics.address", "0 to 65535"),
    ("metrics", "address = '::1:9741'", "metrics.address", "[::1]:9741"),
    ("metrics", "address = ':9741'", "metrics.address", "HOST:PORT"),
    ("metrics", "address = 9741", "metrics.address", "HOST:PORT"),
    ("backend", "max_ring_page_order = 5", "backend.max_ring_page_order", "from 0 to 4"),
    ("backend", "max_ring_page_order = -1", "backend.max_ring_page_order", "from 0 to 4"),
    ("backend", "max_ring_page_order = 2.0", "backend.max_ring_page_order", "an integer"),
    ("backend", "max_ring_page_order = true", "backend.max_ring_page_order", "an integer"),
    ("backend", "max_queues = 0", "backend.max_queues", "from 1 to 64"),
    ("backend", "max_queues = 65", "backend.max_queues", "from 1 to 64"),
    ("backend", "max_indirect_segments = 11", "backend.max_indirect_segments", "0 (no indirect"),
    ("backend", "max_indirect_segments = 1025", "backend.max_indirect_segments", "12 to 1024"),
    ("backend", "max_indirect_segments = 4096", "backend.max_indirect_segments", "12 to 1024"),
    ("backend", "grant_mode = 'grant'", "backend.grant_mode", "'auto', 'persistent', 'map', 'copy'"),
    ("backend", "max_persistent_grants = -1", "backend.max_persistent_grants", "from 0 to 16384"),
    ("backend", "max_persistent_grants = 16385", "backend.max_persistent_grants", "from 0 to 16384"),
    ("backend", "max_persistent_grants = 1000000000000000000000000000000",
     "backend.max_persistent_grants", "from 0 to 16384"),
    ("backend", "persistent_grant_idle = 0", "backend.persistent_grant_idle", "> 0"),
    ("backend", "direct_io = true", "backend.direct_io", "'auto', 'never', 'always'"),
    ("backend", "discard = 0", "backend.discard", "true or false"),
    ("backend", "io_threads = 0", "backend.io_threads", "from 1 to 1024"),
    ("backend", "io_threads = 1025", "backend.io_threads", "from 1 to 1024"),
    ("backend", "control_threads = 0", "backend.control_threads", "from 1 to 64"),
    ("backend", "control_threads = 65", "backend.control_threads", "from 1 to 64"),
    ("backend", "control_timeout = 0", "backend.control_timeout", "> 0"),
    ("backend", "control_timeout = inf", "backend.control_timeout", "finite"),
    ("backend", "guest_log_rate = -1", "backend.guest_log_rate", ">= 0 and <= 6000"),
    ("backend", "guest_log_rate = 6000.5", "backend.guest_log_rate", ">= 0 and <= 6000"),
]


@pytest.mark.parametrize("section,line,key,allowed", BAD_VALUES)
def test_bad_value_names_key_and_what_is_allowed(
    tmp_path: Path, section: str, line: str, key: str, allowed: str
) -> None:
    """Every wrong type or out-of-range value is refused with one line that names the
    key, says what is allowed and shows what was given."""
    message = error_of(tmp_path, f"[{section}]\n{line}\n")
    assert key in message
    assert allowed in message
    assert "(got " in message


#: every count-like key and its documented upper bound (issue 10: max_persistent_grants
#: took 10**30, and a guest could make gblk keep as many mappings as it had grants)
UPPER_BOUNDS = {
    "backend.max_ring_page_order": cfgmod.MAX_RING_PAGE_ORDER,
    "backend.max_queues": cfgmod.MAX_QUEUES,
    "backend.max_indirect_segments": cfgmod.MAX_INDIRECT_SEGMENTS,
    "backend.max_persistent_grants": cfgmod.MAX_PERSISTENT_GRANTS,
    "backend.io_threads": cfgmod.MAX_IO_THREADS,
    "backend.control_threads": cfgmod.MAX_CONTROL_THREADS,
    "backend.guest_log_rate": cfgmod.MAX_GUEST_LOG_RATE,
    "cbt.granularity": 1 << 24,
    "cbt.max_bits": cfgmod.MAX_CBT_BITS,
}


def _shown(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def test_every_integer_key_is_listed_with_a_bound() -> None:
    """A new integer key cannot slip in without an upper bound: each is in the table."""
    ints = {name for name, default, _ in cfgmod.keys()
            if isinstance(default, int) and not isinstance(default, bool)}
    assert ints <= set(UPPER_BOUNDS)


@pytest.mark.parametrize("name", sorted(UPPER_BOUNDS))
def test_count_keys_have_an_upper_bound(name: str) -> None:
    """Each count-like key takes its bound and refuses one more, and 10**30, from the
    command line too, with the bound in the message; README states the same bound."""
    bound = UPPER_BOUNDS[name]
    assert load_config(None, {name: bound}).get(name) == bound
    for bad in (bound + 1, 10**30):
        with pytest.raises(ConfigError) as info:
            load_config(None, {name: bad})
        assert name in str(info.value) and _shown(bound) in str(info.value)
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
    allowed = row.split("|")[3].strip()
    assert allowed.endswith(f"..{_shown(bound)}"), row


GOOD_VALUES = [
    ("daemon", "kinds = ['vbd3', 'qdisk', 'vbd']", "daemon.kinds", ("vbd3", "qdisk", "vbd")),
    ("daemon", "xen = 'sim:/tmp/host'", "daemon.xen", "sim:/tmp/host"),
    ("daemon", "stop_timeout = 3", "daemon.stop_timeout", 3.0),
    ("metrics", "address = '[::1]:9741'", "metrics.address", "[::1]:9741"),
    ("metrics", "address = '0.0.0.0:0'", "metrics.address", "0.0.0.0:0"),
    ("metrics", "address = 'localhost:9741'", "metrics.address", "localhost:9741"),
    ("backend", "max_ring_page_order = 0", "backend.max_ring_page_order", 0),
    ("backend", "max_indirect_segments = 0", "backend.max_indirect_segments", 0),
    ("backend", "max_indirect_segments = 12", "backend.max_indirect_segments", 12),
    ("backend", "max_indirect_segments = 1024", "backend.max_indirect_segments", 1024),
    ("backend", "max_ring_page_order = 4", "backend.max_ring_page_order", 4),
    ("backend", "max_queues = 64", "backend.max_queues", 64),
    ("backend", "max_persistent_grants = 16384", "backend.max_persistent_grants", 16384),
    ("backend", "control_threads = 64", "backend.control_threads", 64),
    ("backend", "control_timeout = 0.5", "backend.control_timeout", 0.5),
    ("backend", "guest_log_rate = 6000", "backend.guest_log_rate", 6000.0),
    ("backend", "max_persistent_grants = 0", "backend.max_persistent_grants", 0),
    ("backend", "guest_log_rate = 0", "backend.guest_log_rate", 0.0),
    ("backend", "io_threads = 1024", "backend.io_threads", 1024),
]


@pytest.mark.parametrize("section,line,key,value", GOOD_VALUES)
def test_edge_values_are_accepted(tmp_path: Path, section: str, line: str, key: str, value: object) -> None:
    """The boundaries of each range are allowed; integers are accepted for seconds."""
    config = load_config(write(tmp_path, f"[{section}]\n{line}\n"), {})
    assert config.get(key) == value


def test_float_keys_hold_floats(tmp_path: Path) -> None:
    """``stop_timeout = 3`` (a TOML integer) becomes 3.0, so the daemon can rely on floats."""
    config = load_config(write(tmp_path, "[daemon]\nstop_timeout = 3\n"), {})
    assert isinstance(config.daemon.stop_timeout, float)


def test_sim_dir_and_address_parts() -> None:
    """Helpers the daemon uses: the simulated host's directory, host and port."""
    config = load_config(None, {"daemon.xen": "sim:/run/h", "metrics.address": "[::1]:9"})
    assert config.daemon.sim_dir == "/run/h"
    assert (config.metrics.host, config.metrics.port) == ("::1", 9)
    assert load_config(None, {}).daemon.sim_dir is None


@pytest.mark.parametrize(
    "text,expected",
    [("127.0.0.1:9741", ("127.0.0.1", 9741)), ("[::]:0", ("::", 0)), ("host:65535", ("host", 65535))],
)
def test_parse_address(text: str, expected: tuple) -> None:
    """HOST:PORT and [IPv6]:PORT split as documented."""
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "9741", "host:", ":1", "[::1]9741", "[]:1", "[1.2.3.4]:1", "a:b", "h:-1"])
def test_parse_address_rejects(text: str) -> None:
    """Malformed addresses are refused."""
    with pytest.raises(ValueError):
        parse_address(text)


# --- overrides ------------------------------------------------------------------------


def test_flags_override_the_file(tmp_path: Path) -> None:
    """Command-line values win over the file; None means "flag not given"."""
    path = write(tmp_path, '[daemon]\nlog_level = "error"\nxen = "real"\n[metrics]\nenabled = true\n')
    config = load_config(
        path,
        {"daemon.log_level": "debug", "daemon.xen": None, "daemon.kinds": "qdisk,vbd",
         "metrics.enabled": False},
    )
    assert config.daemon.log_level == "debug"
    assert config.daemon.xen == "real"
    assert config.daemon.kinds == ("qdisk", "vbd")
    assert config.metrics.enabled is False


def test_bad_flag_value_is_one_line_naming_the_key() -> None:
    """A bad --metrics-address is reported like a bad file value, marked as a flag."""
    with pytest.raises(ConfigError) as info:
        load_config(None, {"metrics.address": "nowhere"})
    assert str(info.value).startswith("command line: metrics.address must be HOST:PORT")


def test_unknown_override_key_is_refused() -> None:
    """A programming error in a caller is not silently ignored."""
    with pytest.raises(ConfigError, match="unknown configuration key daemon.nope"):
        load_config(None, {"daemon.nope": 1})


# --- SIGHUP ---------------------------------------------------------------------------


def test_live_keys_are_the_documented_ones() -> None:
    """Exactly these keys can change without a restart (README says so)."""
    assert LIVE_KEYS == {
        "daemon.log_level",
        "metrics.web_config",
        "backend.guest_log_rate",
        "backend.max_persistent_grants",
        "backend.persistent_grant_idle",
    }


def test_reload_diff_splits_live_and_restart_only_changes(tmp_path: Path) -> None:
    """SIGHUP applies what it can and names what needs a restart."""
    old = load_config(None, {})
    new = load_config(
        write(tmp_path, '[daemon]\nlog_level = "debug"\nkinds = ["vbd"]\n'
              "[backend]\nmax_persistent_grants = 10\nio_threads = 4\n"),
        {},
    )
    applied, not_applied = old.reload_diff(new)
    assert applied == ["daemon.log_level", "backend.max_persistent_grants"]
    assert not_applied == ["daemon.kinds", "backend.io_threads"]
    merged = old.with_live_changes(new)
    assert merged.daemon.log_level == "debug"
    assert merged.backend.max_persistent_grants == 10
    assert merged.daemon.kinds == ("qdisk",)
    assert merged.backend.io_threads == 16


def test_reload_rereads_the_same_file_with_the_same_flags(tmp_path: Path) -> None:
    """Config.reload() reads the file again; flags given at start still win."""
    path = write(tmp_path, '[daemon]\nlog_level = "info"\n[metrics]\naddress = "127.0.0.1:1"\n')
    config = load_config(path, {"metrics.address": "127.0.0.1:2"})
    Path(path).write_text('[daemon]\nlog_level = "warning"\n[metrics]\naddress = "127.0.0.1:3"\n')
    again = config.reload()
    assert again.daemon.log_level == "warning"
    assert again.metrics.address == "127.0.0.1:2"
    Path(path).write_text("[daemon]\nlog_level = 7\n")
    with pytest.raises(ConfigError):
        config.reload()


def test_reload_of_default_path_without_file_stays_default() -> None:
    """A daemon started without a file keeps defaults on SIGHUP."""
    config = load_config(None, {"daemon.log_level": "error"})
    assert config.reload() == config


# --- round trip -----------------------------------------------------------------------

_values = {
    "daemon.log_level": st.sampled_from(cfgmod.LOG_LEVELS),
    "daemon.kinds": st.lists(st.sampled_from(cfgmod.KINDS), min_size=1, max_size=3, unique=True),
    "daemon.xen": st.one_of(st.just("real"), st.from_regex(r"sim:/[a-z0-9/]{1,20}", fullmatch=True)),
    "daemon.stop_timeout": st.floats(min_value=0.001, max_value=1e6),
    "daemon.watchdog": st.booleans(),
    "daemon.xenstore_timeout": st.floats(min_value=0.001, max_value=1e6),
    "metrics.enabled": st.booleans(),
    "metrics.address": st.builds(
        lambda h, p: f"{h}:{p}", st.sampled_from(["127.0.0.1", "[::1]", "0.0.0.0", "localhost"]),
        st.integers(0, 65535),
    ),
    "backend.max_ring_page_order": st.integers(0, cfgmod.MAX_RING_PAGE_ORDER),
    "backend.max_queues": st.integers(1, cfgmod.MAX_QUEUES),
    "backend.max_indirect_segments": st.one_of(
        st.just(0), st.integers(cfgmod.MIN_INDIRECT_SEGMENTS, cfgmod.MAX_INDIRECT_SEGMENTS)),
    "backend.grant_mode": st.sampled_from(cfgmod.GRANT_MODES),
    "backend.max_persistent_grants": st.integers(0, cfgmod.MAX_PERSISTENT_GRANTS),
    "backend.persistent_grant_idle": st.floats(min_value=0.001, max_value=1e6),
    "backend.direct_io": st.sampled_from(cfgmod.DIRECT_IO_MODES),
    "backend.discard": st.booleans(),
    "backend.io_threads": st.integers(1, cfgmod.MAX_IO_THREADS),
    "backend.control_threads": st.integers(1, cfgmod.MAX_CONTROL_THREADS),
    "backend.control_timeout": st.floats(min_value=0.001, max_value=1e6),
    "backend.guest_log_rate": st.floats(min_value=0.0, max_value=cfgmod.MAX_GUEST_LOG_RATE),
}


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional=_values))
def test_any_valid_configuration_round_trips_through_toml(values: Dict[str, object]) -> None:
    """Whatever valid values are set, ``gblk config`` output (to_toml) reads back as the
    same configuration: the printed configuration is exactly what gblk runs with."""
    first = load_config(None, values)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.toml"
        path.write_text(first.to_toml())
        second = load_config(str(path), {})
    for name, _, _ in cfgmod.keys():
        a, b = first.get(name), second.get(name)
        if isinstance(a, float):
            assert math.isclose(a, b), name  # type: ignore[arg-type]
        else:
            assert a == b, name
