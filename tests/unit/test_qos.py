"""IO limit settings, the leaky buckets and the dirty bitmap's bookkeeping, as pure code.

The semantics are QEMU's (util/throttle.c, docs/throttle.txt): these tests pin the
figures a user can work out from the documentation: how many requests a greedy guest
gets in a given time, with and without a burst; which settings QEMU refuses. The
bitmap tests pin the one rule of changed-block tracking: a write waits for a sync
whenever one of its bits is not durable yet, and only then.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List

import pytest

from gblk.engine import cbt
from gblk.engine.stats import DeviceStats
from gblk.engine.throttle import Limiter, Throttles
from gblk.errors import ConfigError
from gblk.qos import DiskIdentity, parse_limits, parse_rules


def _greedy(lim: Limiter, seconds: float, write: bool = False, nbytes: int = 4096,
            step: float = 0.0005) -> List[float]:
    """A guest that always has a request waiting: the times each one went."""
    t, out = 0.0, []
    while t < seconds and len(out) < 20000:
        w = lim.admit(write, nbytes, t)
        if w == 0:
            out.append(t)
            t += 1e-5  # a request takes a little time to send
        else:
            t += max(w, step)
    return out


def test_iops_without_a_burst_is_the_rate_plus_a_tenth_of_a_second():
    lim = Limiter(parse_limits({"iops_total": 100}))
    got = _greedy(lim, 10.0)
    assert 1000 <= len(got) <= 1000 + 10 + 1


def test_a_burst_runs_at_its_rate_until_the_bucket_is_full():
    """iops 100, max 500 for 2 s: a bucket of 1000; it fills at 400/s, so the burst
    lasts 2.5 s at 500/s, then 100/s (QEMU: 'the guest can do max for length s')."""
    lim = Limiter(parse_limits({"iops_total": 100, "iops_total_max": 500,
                                "iops_total_max_length": 2}))
    got = _greedy(lim, 10.0)
    first = sum(1 for t in got if t < 1.0)
    assert 500 <= first <= 500 + 50 + 1
    assert abs(len(got) - (100 * 10 + 1000)) <= 60
    late = sum(1 for t in got if 6.0 <= t < 10.0)
    assert abs(late - 400) <= 2


def test_bytes_count_against_bps_and_reads_not_against_write_buckets():
    lim = Limiter(parse_limits({"bps_write": 1 << 20}))
    assert len(_greedy(lim, 5.0, write=False)) == 20000  # reads are free
    lim = Limiter(parse_limits({"bps_write": 1 << 20}))
    got = _greedy(lim, 5.0, write=True, nbytes=65536)
    assert abs(len(got) * 65536 - 5 * (1 << 20)) <= 0.1 * 5 * (1 << 20) + 65536


def test_new_limits_wake_the_waiting_rings():
    lim = Limiter(parse_limits({"iops_total": 1}))
    woken: List[int] = []
    lim.waiters.add(lambda: woken.append(1))
    lim.configure(parse_limits({"iops_total": 1000}))
    assert woken == [1] and not lim.waiters


@pytest.mark.parametrize("table, says", [
    ({"iops_total": -1}, "iops_total must be an integer from 0 to"),
    ({"iops_total": 10 ** 16}, "from 0 to 1000000000000000"),
    ({"iops_total": 1.5}, "must be an integer"),
    ({"iops_total": True}, "must be an integer"),
    ({"iops_total": "5"}, "must be an integer"),
    ({"iops_total": float("nan")}, "must be an integer"),
    ({"iops": 5}, "unknown limit 'iops'"),
    ({"bps_total": 5, "bps_read": 5}, "bps_total and bps_read cannot be set together"),
    ({"iops_total_max": 5}, "iops_total_max needs iops_total"),
    ({"iops_total": 50, "iops_total_max": 10}, "cannot be lower than iops_total"),
    ({"iops_total": 50, "iops_total_max_length": 3}, "needs iops_total_max"),
    ({"iops_total": 5, "iops_total_max": 9, "iops_total_max_length": 0}, "from 1 to 86400"),
])
def test_qemus_invalid_settings_are_refused_with_one_line(table, says):
    with pytest.raises(ValueError) as info:
        parse_limits(table)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_rules_match_first_and_groups_share_one_limiter():
    rules = parse_rules(
        [{"image": "/srv/a*.img", "iops_total": 10}, {"domain": "web*", "group": "g"},
         {"uuid": "*", "backend": "*/qdisk/*", "bps_total": 7}],
        {"g": {"iops_total": 99}})
    assert rules.find(DiskIdentity(image="/srv/a1.img", domain="web1"))[1].as_dict() == {
        "iops_total": 10}
    assert rules.find(DiskIdentity(domain="web2")) == ("g", rules.groups[0][1])
    assert rules.find(DiskIdentity(uuid="u", backend="/x/qdisk/5/1"))[1].as_dict() == {
        "bps_total": 7}
    assert rules.find(DiskIdentity(image="/other")).__getitem__(1).unlimited
    th = Throttles(rules, lambda: 0.0)
    a = th.attach("a", DiskIdentity(domain="web1"), DeviceStats(1, 1, "qdisk"))
    b = th.attach("b", DiskIdentity(domain="web2"), DeviceStats(2, 1, "qdisk"))
    assert a.limiter is b.limiter is th.groups["g"] and a.stats.io_limits == {"iops_total": 99}
    th.set_disk("a", parse_limits({"iops_total": 5}))
    assert a.limiter is not b.limiter and a.group == "" and a.source == "control"
    th.reload(rules)  # SIGHUP: the rules again
    assert a.limiter is th.groups["g"] and a.source == "config"


@pytest.mark.parametrize("rules, groups, says", [
    ([{"iops_total": 5}], None, "needs at least one of domain, uuid, backend, image"),
    ([{"image": "*", "group": "nope"}], None, "group 'nope' is not a [limit_groups] table"),
    ([{"image": "*", "group": "g", "iops_total": 5}], {"g": {"iops_total": 1}},
     "takes its limits from the group"),
    ([{"image": 5, "iops_total": 5}], None, "image must be a non-empty string"),
    ({"image": "*"}, None, "limit must be an array of tables"),
    (None, {"g": {"iops_total": -2}}, "limit_groups.g: iops_total must be"),
])
def test_bad_rules_are_configuration_errors(rules, groups, says):
    with pytest.raises(ConfigError) as info:
        parse_rules(rules, groups)
    assert says in str(info.value)


# -- the dirty bitmap -------------------------------------------------------------------
class _Now:
    """A threadpool that runs each job at once and its links when asked."""

    def __init__(self) -> None:
        self.pending: List[Callable[[], None]] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Any:
        value = fn(*args)
        pool = self

        class _Res:
            def rawlink(self, cb: Callable[[Any], None]) -> None:
                pool.pending.append(lambda: cb(self))

            def get(self, block: bool = True) -> Any:
                return value

        return _Res()

    def run(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class _Log:
    def error(self, *a: Any) -> None:
        pass


def _tracker(tmp_path, size=64 << 20, gran=65536):
    path = str(tmp_path / "cbt" / "x.cbt")
    fd, bits = cbt.create_file(path, "/img", gran, size)
    pool = _Now()
    return cbt.Tracker(path, fd, gran, size, bits, pool, DeviceStats(1, 1, "qdisk"), _Log()), pool


def test_a_write_waits_for_a_sync_only_while_its_bits_are_not_durable(tmp_path):
    t, pool = _tracker(tmp_path)
    need, tok = t.mark(0, 8)  # a new bit
    assert need > 0
    ran: List[int] = []
    t.after(need, lambda: ran.append(1))
    assert ran == []  # not before the sync completes
    need2, _ = t.mark(4, 4)  # the same granule, its sync in flight: waits too
    assert need2 > 0
    pool.run()
    assert ran == [1]
    assert t.mark(16, 8)[0] == 0  # durable now: no wait
    t.done(tok)
    loaded = cbt.load_file(t.path, 64 << 20)
    assert loaded is not None and loaded[2][0] & 1  # on disk
    os.close(loaded[0])


def test_extents_merge_and_reset_keeps_writes_in_flight(tmp_path):
    t, pool = _tracker(tmp_path)
    done = [t.mark(0, 128)[1], t.mark(128, 128)[1]]  # granules 0 and 1, answered
    _, tok = t.mark(128 * 10, 1)  # granule 10, still in flight
    done.append(t.mark(128 * 1000, 128 * 30)[1])  # granules 1000..1023: the disk's end
    for d in done:
        t.done(d)
    assert t.extents() == [[0, 2 * 65536], [10 * 65536, 65536], [1000 * 65536, 24 * 65536]]
    old = t.reset()
    assert len(old) == 3 and t.extents() == [[10 * 65536, 65536]]
    t.done(tok)
    pool.run()
    assert t.reset() == [[10 * 65536, 65536]] and t.extents() == []


def test_a_grown_disk_is_dirty_in_its_new_part(tmp_path):
    t, pool = _tracker(tmp_path, size=1 << 20)
    t.grow(2 << 20, "/img")
    pool.run()
    assert t.extents() == [[1 << 20, 1 << 20]]
    loaded = cbt.load_file(t.path, 2 << 20)
    assert loaded is not None and loaded[1] == 65536
    os.close(loaded[0])
