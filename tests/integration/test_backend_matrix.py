"""The backend's operation matrix on the simulated host, through real processes:
every operation x ABI (and an absent protocol node) x ring order 0 and 4 x page path
(persistent grants, map per request, grant copy) x one and several queues, each
verified byte for byte by the guest and in the image file."""

from __future__ import annotations

import itertools

import pytest

from gblk.sim.guest.frontend import FrontendOptions
from gblk.sim.harness.host import SimHost

from .backend_support import (
    exercise,
    logs_on_failure,
    metric,
    metrics_url,
    scrape,
    start_daemon,
)

ABIS = ["x86_64-abi", "x86_32-abi", None]
ORDERS = [0, 4]
PATHS = ["persistent", "map", "copy"]
QUEUES = [1, 3]


@pytest.fixture(scope="module")
def host():
    """One host, two daemons: ``auto`` grants on qdisk (persistent or map, as the
    frontend chooses), grant copy on vbd3."""
    with SimHost() as h:
        auto = start_daemon(h, "auto", '[daemon]\nkinds = ["qdisk"]\n')
        copy = start_daemon(h, "copy", '[daemon]\nkinds = ["vbd3"]\n[backend]\ngrant_mode = "copy"\n')
        h.daemons = {"auto": auto, "copy": copy}
        h.urls = {"auto": metrics_url(auto), "copy": metrics_url(copy)}
        try:
            yield h
        finally:
            for d in (auto, copy):
                d.stop()


@pytest.mark.parametrize(
    "abi,order,path,queues",
    list(itertools.product(ABIS, ORDERS, PATHS, QUEUES)),
    ids=lambda v: str(v),
)
def test_every_operation(host, abi, order, path, queues):
    """READ, WRITE (11 segments and INDIRECT), FLUSH with and without data, BARRIER,
    DISCARD, many in flight: all answered OKAY, every byte where the guest put it."""
    opts = FrontendOptions(protocol=abi, max_ring_page_order=order, max_queues=queues,
                           persistent=path == "persistent", initial_zero=True)
    kind = "vbd3" if path == "copy" else "qdisk"
    with logs_on_failure(*host.daemons.values()):
        _run(host, opts, kind, path, queues)


def _run(host, opts, kind, path, queues):
    g = host.create_guest(size=32 << 20, kind=kind, options=opts)
    fe = g.frontend
    assert fe.disk.persistent == (path == "persistent")
    assert len(fe.queues) == queues
    exercise(fe, g.image)
    samples = scrape(host.urls["copy" if path == "copy" else "auto"])
    dom = str(g.domid)
    if path == "copy":
        assert metric(samples, "gblk_grant_copy_segments_total", domain=dom) > 0
    elif path == "persistent":
        assert metric(samples, "gblk_persistent_grants", domain=dom) > 0
    else:
        assert metric(samples, "gblk_grant_maps_total", domain=dom) > 0
        assert metric(samples, "gblk_persistent_grants", domain=dom) == 0
    fe.close()
    assert fe.stats.grant_leaks == 0
    host.destroy_guest(g)
