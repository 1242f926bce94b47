"""gblk on a real Xen 4.17 hypervisor, served to Linux's own xen-blkfront (the system suite).

Each test reads one scenario that dom0's payload ran during the session's single boot
(``conftest.xen_run``); the scenario's checks run in dom0 (image files, XenStore, gblk's
metrics, Xen's domain list) and in the guest (its console reports every step). A failure
shows the failed checks, the guest's console, gblk's log and the payload's log.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest

pytestmark = pytest.mark.xen

Scenario = Callable[[], Dict[str, Any]]


@pytest.mark.scenario("install")
def test_the_deb_installs_offline_as_an_operator_installs_it(scenario: Scenario) -> None:
    """The .deb built from the tree (dpkg-buildpackage -us -uc -b) installs in dom0 with
    `apt-get install ./gblk_<version>_all.deb` and no network (its Depends are in the
    image, nothing is downloaded); the commands, the /etc/xen/scripts link, the conffile
    and the unit are where Debian puts them, gblk imports from the package (no
    PYTHONPATH: every other scenario runs this install), and `man gblk` works."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]}
    assert {"apt-get-install", "nothing-downloaded", "dpkg-installed", "hotplug-link", "conffile",
            "unit-runs-the-package", "imports-the-package", "man gblk", "man gblk-xl-hotplug"} <= ok
    assert result["data"]["deb"].startswith("gblk_") and result["data"]["deb"].endswith("_all.deb")


@pytest.mark.scenario("probe")
def test_bindings_on_real_xen(scenario: Scenario) -> None:
    """gblk's cffi bindings and XenStore client work on real Xen: dom0 grants pages to itself
    and gblk maps them (read-write and read-only), grant-copies both ways, binds an
    event channel and notifies both ways, and talks to xenstored."""
    result = scenario()
    names = {c["name"] for c in result["checks"] if c["ok"]}
    assert {"gnttab-map-rw", "gnttab-map-ro", "evtchn-roundtrip", "xenstore"} <= names


@pytest.mark.scenario("fio_verify")
def test_fio_verify_phy_and_qdisk(scenario: Scenario) -> None:
    """fio --verify=crc32c, --direct=1, random writes of 4 KiB to 1 MiB (INDIRECT requests)
    at iodepth 1, 8 and 32 (with flushes), on a disk handed over as backendtype=phy with
    gblk's hotplug script and one as backendtype=qdisk with QEMU replaced: zero verify
    errors."""
    result = scenario()
    assert [s["name"] for s in result["steps"] if s["ok"]] == ["disks", "fio-qd1", "fio-qd8", "fio-qd32"]
    for qd in ("qd1", "qd8", "qd32"):
        for job in result["data"][qd]:
            assert job["error"] == 0 and job["write_bytes"] > 0, job


@pytest.mark.scenario("fio_verify")
def test_metrics_account_for_guest_io(scenario: Scenario, xen_run: Any, request: pytest.FixtureRequest) -> None:
    """gblk's Prometheus metrics, scraped in dom0 while the guest is connected, count
    exactly the bytes fio wrote (and at least what it read back), flushes, no errors; the
    guest's series vanish once it is destroyed."""
    scenario()  # the fio run itself must have passed
    metrics = xen_run.require(request.node, "metrics")
    for job in ("phy", "qdisk"):
        assert metrics["data"][job]["gblk_write"] == metrics["data"]["fio"]["write"][job]


@pytest.mark.scenario("mkfs_fsck")
def test_mkfs_copy_fsck(scenario: Scenario) -> None:
    """mkfs.ext4 on a gblk disk, a tree copied in, sync, unmount: fsck -f finds it clean
    and every file's checksum matches after a remount."""
    result = scenario()
    assert {"fsck", "checksums"} <= {s["name"] for s in result["steps"] if s["ok"]}


@pytest.mark.scenario("reboot")
def test_reconnect_after_guest_reboot(scenario: Scenario) -> None:
    """A guest reboot (xl restarts it as a new domain): blkfront connects again to gblk and
    the data written before the reboot is intact; Xen releases the old domain and its
    metrics series are gone."""
    result = scenario()
    assert "verify-after-reboot" in {s["name"] for s in result["steps"] if s["ok"]}


@pytest.mark.scenario("attach_detach")
def test_block_attach_detach_while_running(scenario: Scenario) -> None:
    """xl block-attach, block-detach and block-attach again of a second gblk disk while
    the guest does IO on its first disk: data written before the detach reads back after
    the re-attach, the backend directory and the device's series are gone after detach,
    and the background IO never failed."""
    result = scenario()
    ok = {s["name"] for s in result["steps"] if s["ok"]}
    assert {"attached-write", "detached", "reattached-verify", "background-io"} <= ok


@pytest.mark.scenario("read_only")
def test_read_only_disks(scenario: Scenario) -> None:
    """access=ro disks (phy and qdisk): the guest sees them read-only, its writes fail,
    reads return the image's data, and the image files are unchanged."""
    result = scenario()
    ok = {s["name"] for s in result["steps"] if s["ok"]}
    assert {"xvda-sees-ro", "xvda-write-fails", "xvdb-sees-ro", "xvdb-write-fails"} <= ok


@pytest.mark.scenario("discard")
def test_discard_punches_holes(scenario: Scenario) -> None:
    """blkdiscard on a raw disk and fstrim on ext4 (phy and qdisk): the image files lose
    the allocation of the discarded ranges, and a discarded range reads back as zeroes."""
    result = scenario()
    assert result["data"]["xvda_allocated_end"] < result["data"]["xvda_allocated_after_write"]


@pytest.mark.scenario("two_guests")
def test_two_guests_one_destroyed_mid_io(scenario: Scenario) -> None:
    """Two guests with two gblk disks each under verified IO; one is destroyed with
    xl destroy mid-IO: the other's IO completes without error, Xen releases the destroyed
    domain (no grant left mapped keeps it alive), its backend directories and metric
    series go, and once both are gone gblk holds no grant mappings."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]}
    assert {"b-domain-released", "a-io-loop", "no-grant-mappings-left"} <= ok


@pytest.mark.scenario("qcow2")
def test_qcow2_image_through_qemu_nbd(scenario: Scenario) -> None:
    """A qcow2 image (xl's format=qcow2, backendtype=qdisk) served through the qemu-nbd gblk
    supervises: fio --verify=crc32c with flushes, mkfs.ext4, a tree copied in, fsck -f
    clean and every checksum right after a remount; one qemu-nbd while the disk is there,
    none after, and qemu-img check finds the image clean (issue 11)."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]} | {s["name"] for s in result["steps"] if s["ok"]}
    assert {"one-qemu-nbd", "fio-verify", "fio-no-errors", "fsck", "checksums", "qemu-nbd-stopped",
            "qemu-img-check"} <= ok


@pytest.mark.scenario("restart")
def test_fio_verify_across_sigkills_of_gblk(scenario: Scenario) -> None:
    """fio --verify=crc32c runs in a Linux guest while gblk is SIGKILLed twice and started
    again as its unit says, then hands its disks over to a successor on SIGUSR2 (the
    package's upgrade) (issue 10): every fio run passes, the guest's kernel logs no
    I/O error and no "Setting capacity" (the restarted gblk rewrites nothing blkfront
    takes for a resize), and gblk counts no error."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]} | {s["name"] for s in result["steps"] if s["ok"]}
    assert {"fio-verify", "kernel-log", "restarts", "handover", "no-gblk-errors"} <= ok
    assert len(result["data"]["restart_seconds"]) == 2


@pytest.mark.scenario("backup")
def test_live_backup_full_and_incremental_while_the_guest_writes(scenario: Scenario) -> None:
    """README's backup on real Xen (issue 13) while the guest keeps writing: changed-block
    tracking on, a live export copied with qemu-img convert equals the disk at the
    export's point in time byte for byte (the guest wrote meanwhile: blocks were copied
    before its writes), and after cbt reset a second export's dirty extents (qemu-img map
    x-dirty-bitmap), copied by the packaged gblk-apply-extents into the full backup, give
    the disk at that point in time; then an IO limit set by gblk ctl holds the guest's
    random reads at the limit."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]} | {s["name"] for s in result["steps"] if s["ok"]}
    assert {"fill", "writes", "full-backup-is-the-point-in-time", "guest-wrote-during-the-export",
            "export-socket-gone", "incremental-is-partial", "apply-extents",
            "incremental-backup-is-the-point-in-time", "limited-read", "kernel-log", "limit-held"} <= ok


@pytest.mark.scenario("readme_qdisk")
def test_readme_qdisk_line_on_the_default_configuration(scenario: Scenario) -> None:
    """The default configuration serves a guest (issue 15): README's backendtype=qdisk
    disk line and device_model_override, taken from README.md as written, with the
    installed gblk.service on /etc/gblk/gblk.toml as the package ships it (kinds =
    ["qdisk"]) and no QEMU binary in dom0.
    libxl starts the shipped gblk-device-model and speaks QMP to it, gblk serves the disk
    (connected, the guest's writes counted and in the image file), and the device model
    exits cleanly once the guest is gone."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]}
    assert {"packaged-configuration", "override-installed", "qemu-absent", "device-model-is-gblk", "gblk-serves-the-disk", "image-holds-the-guest-data",
            "libxl-spoke-qmp", "device-model-exited", "device-model-stopped-cleanly"} <= ok
    assert any("backendtype=qdisk" in line for line in result["data"]["config_lines"])


@pytest.mark.scenario("service")
def test_installed_unit_contract(scenario: Scenario) -> None:
    """The installed gblk.service, started as its unit says (dom0 has no systemd:
    docs/testing.md): its conditions hold in dom0, READY=1 and STATUS= come from the main
    process only (Type=notify, NotifyAccess=main), watchdog pings never leave a gap of
    WatchdogSec= over the whole run of every scenario, ExecReload= keeps it serving, and
    a stop ends it with exit 0 after STOPPING=1."""
    result = scenario()
    ok = {c["name"] for c in result["checks"] if c["ok"]}
    assert {"ready", "status-line", "notify-access-main", "watchdog-pings", "reload-keeps-serving",
            "reload-logged", "stop-clean", "started-again"} <= ok
    runs = result["data"]["runs"]
    assert len(runs) >= 2 and runs[-1]["pings"] > 0, runs
    assert {f"watchdog-run-{i}" for i in range(len(runs))} <= ok
