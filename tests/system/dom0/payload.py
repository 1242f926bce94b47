#!/usr/bin/python3
"""The system suite's orchestrator in dom0: gblk, xl guests, checks, one JSON per scenario.

Run by dom0's per-boot init as ``payload.py SHARE``. Reads ``SHARE/config.json`` (written
by the host's runner: which phases and scenarios, gblk's settings, time limits), installs
the gblk .deb the runner built (``SHARE/deb``) with ``apt-get install ./gblk_*.deb`` and
no network (scenario ``install``), sets the suite's settings in the installed
``/etc/gblk/gblk.toml`` and starts the installed ``gblk.service`` the way its unit says
(``service.py``: dom0 has no systemd), creates PV guests with ``xl`` whose disks gblk
serves (``backendtype=phy`` with the package's hotplug script through its
``/etc/xen/scripts`` link, ``backendtype=qdisk`` with the package's ``gblk-device-model``
in QEMU's place), follows each guest through its console log (xenconsoled writes it into
the share), makes dom0-side checks (image files, XenStore, metrics, leftover domains and
mappings) and writes ``SHARE/results/<scenario>.json``. The pytest side asserts on those
files. Nothing of gblk runs from the share: no ``PYTHONPATH``.

Runs on dom0's Debian python3 with the standard library only (gblk runs in a process of
its own). Every wait has a time limit; a failing scenario is recorded and the next one
runs. Must not power off or touch the host: dom0's init does that.
"""

import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
import urllib.request

import service  # dom0/service.py: the unit's way of starting gblk, systemd being absent

SHARE = sys.argv[1] if len(sys.argv) > 1 else "/mnt/share"
RESULTS = os.path.join(SHARE, "results")
LOGS = os.path.join(RESULTS, "logs")
CONSOLES = os.path.join(RESULTS, "consoles")
LAB = "/var/lib/gblk-lab"
#: the hotplug script by its bare name: libxl runs /etc/xen/scripts/gblk-xl-hotplug, the
#: package's link to /usr/bin/gblk-xl-hotplug (README's disk lines say it this way)
HOTPLUG = "gblk-xl-hotplug"
#: gblk's device model for qdisk guests, where the package installs it
DEVICE_MODEL = "/usr/bin/gblk-device-model"
#: the package's configuration file (a conffile) and where the payload keeps its
#: pristine copy while the suite's settings are in place
CONFIG = "/etc/gblk/gblk.toml"
PACKAGED_CONFIG = "/var/lib/gblk-lab/gblk.toml.packaged"
#: where libxl keeps each device model's output (qemu-dm-<guest name>.log)
XEN_LOG_DIR = "/var/log/xen"
CONF = json.load(open(os.path.join(SHARE, "config.json")))
T0 = time.monotonic()
MiB = 1 << 20


def log(msg):
    line = "%8.1f %s" % (time.monotonic() - T0, msg)
    print("@@PAYLOAD " + line.split("\n", 1)[0], flush=True)  # the serial console gets one line
    with open(os.path.join(LOGS, "payload.log"), "a") as f:
        f.write(line + "\n")


def sh(argv, timeout=60, check=True, quiet=False):
    """Run a command with a time limit; its output goes to payload.log. Returns stdout."""
    if isinstance(argv, str):
        argv = shlex.split(argv)
    t = time.monotonic()
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log("TIMEOUT after %ds: %s" % (timeout, " ".join(argv)))
        if check:
            raise Failure("timed out after %ds: %s" % (timeout, " ".join(argv))) from e
        return ""
    out = p.stdout.decode("utf-8", "replace")
    if not quiet or p.returncode:
        log("$ %s  -> rc=%d (%.1fs)%s" % (" ".join(argv), p.returncode, time.monotonic() - t,
                                         ("\n" + out.rstrip()) if out.strip() else ""))
    if check and p.returncode != 0:
        raise Failure("exit %d: %s: %s" % (p.returncode, " ".join(argv), out.strip()[-500:]))
    return out


class Failure(Exception):
    """A scenario step failed (recorded; the next scenario still runs)."""


# --- results -------------------------------------------------------------------------


class Result:
    def __init__(self, name):
        self.name = name
        self.t0 = time.monotonic()
        self.checks = []  # dom0-side checks
        self.steps = []  # guest-side steps (from the console)
        self.timings = {}
        self.data = {}
        self.error = None
        self.consoles = []
        self.logs = []  # extra logs (relative to results/) for the test report

    def check(self, name, ok, detail=""):
        self.checks.append({"name": name, "ok": bool(ok), "detail": str(detail)})
        log("%s: check %s %s %s" % (self.name, name, "ok" if ok else "FAIL", detail))
        return ok

    def mark(self, what):
        self.timings[what] = round(time.monotonic() - self.t0, 1)

    def write(self):
        ok = (self.error is None and all(c["ok"] for c in self.checks)
              and all(s["ok"] for s in self.steps) and bool(self.checks or self.steps))
        doc = {
            "name": self.name, "status": "pass" if ok else "fail",
            "seconds": round(time.monotonic() - self.t0, 1), "timings": self.timings,
            "checks": self.checks, "steps": self.steps, "data": self.data, "error": self.error,
            "consoles": self.consoles, "logs": self.logs,
        }
        path = os.path.join(RESULTS, self.name + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.rename(path + ".tmp", path)
        log("%s: %s in %.1fs" % (self.name, doc["status"].upper(), doc["seconds"]))


# --- guests --------------------------------------------------------------------------


#: console lines after which a guest's IO can never complete (blkfront gave up, or worse)
FATAL_CONSOLE = ("disabled for further use", "response has wrong operation", "Kernel panic",
                 "BUG: ", "Oops: ", "blocked for more than")


class Console:
    """A guest's console as logged by xenconsoled (``--log=guest``), parsed for @@GBLK lines."""

    def __init__(self, name):
        self.path = os.path.join(CONSOLES, "guest-%s.log" % name)

    def text(self):
        try:
            with open(self.path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def records(self):
        out = []
        for line in self.text().splitlines():
            i = line.find("@@GBLK ")
            if i >= 0:
                parts = line[i + 7:].rstrip("\r").split(" ", 2)
                out.append(parts + [""] * (3 - len(parts)))
        return out

    def fatal(self):
        """The first console line saying the guest's disk or kernel broke, or None."""
        for line in self.text().splitlines():
            if any(p in line for p in FATAL_CONSOLE):
                return line.strip()
        return None

    def count(self, kind, arg=None):
        return sum(1 for r in self.records() if r[0] == kind and (arg is None or r[1] == arg))

    def wait(self, kind, arg=None, timeout=120, count=1, domain=None):
        """Wait until ``count`` records ``@@GBLK kind arg`` appeared; Failure on timeout or
        when ``domain`` is gone before that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(kind, arg) >= count:
                return
            bad = self.fatal()
            if bad:
                raise Failure("guest console: %s" % bad)
            if domain is not None and not domain_exists(domain):
                if self.count(kind, arg) >= count:
                    return
                raise Failure("guest %s ended before @@GBLK %s %s" % (domain, kind, arg or ""))
            time.sleep(0.5)
        raise Failure("no @@GBLK %s %s on %s within %ds" % (kind, arg or "", self.path, timeout))

    def steps(self):
        return [{"name": r[1], "ok": r[2].split(" ", 1)[0] == "ok",
                 "detail": r[2].split(" ", 1)[1] if " " in r[2] else ""}
                for r in self.records() if r[0] == "STEP"]

    def json(self, tag):
        for r in self.records():
            if r[0] == "JSON" and r[1] == tag:
                try:
                    return json.loads(r[2])
                except ValueError:
                    return {"unparsed": r[2][:2000]}
        return None


def domain_exists(name):
    p = subprocess.run(["xl", "domid", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       timeout=30)
    return p.returncode == 0


def domid_of(name):
    return int(sh(["xl", "domid", name], quiet=True).strip())


def kernel():
    return sorted(glob.glob("/boot/vmlinuz-*"))[-1]


#: "blkback" while a scenario runs as a reference (name@blkback): its phy disks go to the
#: kernel's xen-blkback through loop devices instead of gblk
REFERENCE = {"phy": "gblk"}


def loop_device(path, readonly=False):
    argv = ["losetup", "--find", "--show", "--direct-io=on"] + (["--read-only"] if readonly else [])
    return sh(argv + [path]).strip()


def disk_spec(vdev, target, kind="phy", access="rw"):
    """An xl disk spec handing ``target`` to gblk (or to the kernel/QEMU for the benchmark)."""
    if kind == "phy" and REFERENCE["phy"] == "blkback":
        kind, target = "blkback", loop_device(target, access == "ro")
    if kind == "phy":  # gblk through kind vbd: its hotplug script, blkback not loaded
        return "format=raw,vdev=%s,access=%s,backendtype=phy,script=%s,target=%s" % (
            vdev, access, HOTPLUG, target)
    if kind == "qdisk":  # gblk through kind qdisk: QEMU replaced by gblk-device-model
        return "format=raw,vdev=%s,access=%s,backendtype=qdisk,target=%s" % (vdev, access, target)
    if kind == "blkback":  # the kernel's xen-blkback (default block script)
        return "format=raw,vdev=%s,access=%s,backendtype=phy,target=%s" % (vdev, access, target)
    raise ValueError(kind)


def make_image(name, mib, fill_mib=0):
    path = os.path.join(LAB, name + ".img")
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        if fill_mib:
            f.write(os.urandom(fill_mib * MiB))
    return path


def file_sha(path, mib):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(mib * MiB))
    return h.hexdigest()


def allocated(path):
    return os.stat(path).st_blocks * 512


class Guest:
    def __init__(self, name, scenario, disks, fio=False, memory=None, extra="", dm="gblk",
                 reboot="destroy", config_lines=None):
        """``config_lines``: the disk and device-model lines exactly as given (README's),
        instead of ``disks`` and ``dm``."""
        self.name = name
        self.console = Console(name)
        ramdisk = os.path.join(LAB, "guest-fio.cpio" if fio else "guest-small.cpio")
        cfg = [
            'name = "%s"' % name,
            'type = "pv"',
            'kernel = "%s"' % kernel(),
            'ramdisk = "%s"' % ramdisk,
            "memory = %d" % (memory or (448 if fio else 192)),
            "vcpus = 1",
            'extra = "console=hvc0 quiet loglevel=4 gblk.scenario=%s %s"' % (scenario, extra),
            'on_poweroff = "destroy"',
            'on_reboot = "%s"' % reboot,
            'on_crash = "destroy"',
        ]
        if config_lines is not None:
            cfg.extend(config_lines)
        else:
            cfg.append("disk = [ %s ]" % ", ".join("'%s'" % d for d in disks))
        if config_lines is None and dm == "gblk" and any("backendtype=qdisk" in d for d in disks):
            cfg.append('device_model_version = "qemu-xen"')
            cfg.append('device_model_override = "%s"' % DEVICE_MODEL)
        self.cfg_path = os.path.join(LAB, name + ".cfg")
        with open(self.cfg_path, "w") as f:
            f.write("\n".join(cfg) + "\n")
        with open(os.path.join(LOGS, name + ".cfg"), "w") as f:
            f.write("\n".join(cfg) + "\n")
        if os.path.exists(self.console.path):
            os.rename(self.console.path, self.console.path + ".old")
        self.domid = None

    def create(self, res):
        t = time.monotonic()
        sh(["xl", "create", self.cfg_path], timeout=CONF["timeouts"]["create"])
        self.domid = domid_of(self.name)
        res.timings["create " + self.name] = round(time.monotonic() - t, 1)
        res.consoles.append(os.path.relpath(self.console.path, RESULTS))
        log("%s: created domid %d in %.1fs" % (self.name, self.domid, time.monotonic() - t))
        return self

    def wait(self, kind, arg=None, timeout=None, count=1):
        self.console.wait(kind, arg, timeout or CONF["timeouts"]["guest"], count, domain=self.name)

    def wait_gone(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not domain_exists(self.name):
                return True
            time.sleep(0.5)
        return False

    def finish(self, res, timeout=90):
        """After the guest powered itself off: Xen must release the domain (a domain whose
        pages a backend still maps stays around as a zombie)."""
        t = time.monotonic()
        gone = self.wait_gone(timeout)
        res.check("%s-released" % self.name, gone,
                  "domain %s gone %.1fs after its DONE" % (self.domid, time.monotonic() - t)
                  if gone else "domain %s still exists %ds after its DONE" % (self.domid, timeout))
        return gone

    def destroy(self):
        if domain_exists(self.name):
            sh(["xl", "destroy", self.name], timeout=60, check=False)


def domain_ids():
    """{domid: name} of every domain Xen still has (dying ones included)."""
    out = sh(["xl", "list"], quiet=True, check=False)
    doms = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            doms[int(parts[1])] = parts[0]
    return doms


# --- gblk ----------------------------------------------------------------------------


class Gblk:
    def __init__(self, log_name="gblk.log"):
        """The installed gblk.service's main process, started as its unit says
        (service.Service: this dom0 has no systemd), with /etc/gblk/gblk.toml as it is
        at start; its output goes to ``logs/LOG_NAME``. ``addr`` is where its metrics
        answer."""
        self.service = service.Service(os.path.join(LOGS, log_name))
        self.log_name = log_name
        self.addr = CONF["gblk"]["metrics_address"]
        self.runs = []  # (pid, READY=1 seen, pings, longest watchdog gap, foreign senders, stop)

    @property
    def proc(self):
        return self.service.proc

    def start(self):
        limit = CONF["timeouts"]["gblk_start"]
        log("gblk: starting %s as %s says" % (self.log_name, service.UNIT))
        try:
            self.service.start(limit)
        except service.UnitError as e:
            self.stop()  # a start that failed leaves nothing running (systemd kills it too)
            raise Failure("gblk.service: %s (see logs/%s)" % (e, self.log_name)) from e
        log("gblk: READY=1 from pid %d: %s" % (self.proc.pid, " ".join(self.service.argv)))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self.alive():
                raise Failure("gblk serve exited with %s after READY=1 (see logs/%s)"
                              % (self.proc.returncode, self.log_name))
            try:
                self.scrape()
                log("gblk: up (pid %d), metrics on %s" % (self.proc.pid, self.addr))
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise Failure("gblk metrics did not answer on %s within %ss" % (self.addr, limit))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def handover(self):
        """The package's upgrade (debian/handover: SIGUSR2 to the main process): the
        running gblk starts its successor, hands the disks over and exits 0; the
        successor is the unit's main process. Returns the timings: to MAINPID=, to the
        old one's exit, to READY=1 (s), and the successor's own "disks served again
        N ms after the handover began" (the guests' pause)."""
        limit = CONF["timeouts"]["gblk_start"]
        old = self.proc.pid
        log("gblk: SIGUSR2 to %d (a handover, as the package's upgrade does)" % old)
        try:
            new, to_main, to_exit, to_ready = self.service.handover(limit)
        except service.UnitError as e:
            raise Failure("gblk.service handover: %s (see logs/%s)" % (e, self.log_name)) from e
        with open(os.path.join(LOGS, self.log_name), "rb") as f:
            text = f.read().decode("utf-8", "replace")
        served = re.findall(r"takeover: disks served again ([0-9.]+) ms after the handover began", text)
        deadline = time.monotonic() + limit
        while True:
            try:
                self.scrape()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise Failure("gblk metrics did not answer on %s within %ss of the handover"
                                  % (self.addr, limit)) from None
                time.sleep(0.5)
        out = {"old_pid": old, "new_pid": new, "mainpid_s": round(to_main, 2),
               "old_exit_s": round(to_exit, 2), "ready_s": round(to_ready, 2),
               "served_again_ms": float(served[-1]) if served else None}
        log("gblk: handed over from %d to %d: %s" % (old, new, out))
        return out

    def dump(self, tag):
        """Evidence of a wedged gblk, taken before cleanup: what `gblk status` and
        `gblk list` say over the control socket and a metrics scrape (logs/*-TAG.txt).
        (The installed gblk has no stack-dump signal: SIGUSR1 would end it, SIGUSR2
        starts a successor.)"""
        if not self.alive():
            return
        for what in ("status", "list"):
            out = sh(["gblk", what], timeout=30, check=False, quiet=True)
            with open(os.path.join(LOGS, "gblk-%s-%s.txt" % (what, tag)), "w") as f:
                f.write(out)
        try:
            text = self.scrape()
        except OSError as e:
            text = "# scrape failed: %s\n" % e
        with open(os.path.join(LOGS, "metrics-%s.txt" % tag), "w") as f:
            f.write(text)
        log("gblk: state in logs/gblk-{status,list}-%s.txt, metrics in logs/metrics-%s.txt" % (tag, tag))

    def scrape(self, path="/metrics"):
        with urllib.request.urlopen("http://%s%s" % (self.addr, path), timeout=10) as r:
            return r.read().decode()

    def metrics(self):
        return parse_metrics(self.scrape())

    def gntdev_mappings(self):
        """Mappings of /dev/xen/gntdev in gblk's address space (guest pages it holds)."""
        try:
            with open("/proc/%d/maps" % self.proc.pid) as f:
                return sum(1 for line in f if "gntdev" in line)
        except OSError:
            return -1

    def cpu_seconds(self):
        """User + system CPU time gblk used so far (from /proc/PID/stat)."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError):
            return None

    def open_fds(self):
        try:
            return len(os.listdir("/proc/%d/fd" % self.proc.pid))
        except OSError:
            return -1

    def stop(self):
        """Stop as the unit says (KillMode=mixed, TimeoutStopSec=); the run's notify
        record goes to ``runs``."""
        if not self.alive():
            return None
        pings, gap = self.service.watchdog_gaps()
        rc = self.service.stop()
        self.runs.append({"pid": self.proc.pid, "ready": self.service.ready(), "pings": pings,
                          "longest_gap": round(gap, 1) if gap is not None else None,
                          "foreign_senders": self.service.foreign_senders(), "stop": rc,
                          "stopping": any(f.get("STOPPING") == "1" for _, _, f in self.service.messages())})
        log("gblk: stopped: %s" % rc)
        return rc


def parse_metrics(text):
    """[(name, {label: value}, float)] from the Prometheus text format."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            pass
    return out


def metric_sum(samples, name, **labels):
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == str(x) for k, x in labels.items()))


def series_for_domain(samples, domid):
    return [(n, lab) for n, lab, _ in samples if lab.get("domain") == str(domid)]


# --- scenarios -------------------------------------------------------------------------

VDEV = {"xvda": 51712, "xvdb": 51728}


def collect(res, guest):
    res.steps.extend(guest.console.steps())


def sc_fio_verify(res, gblk):
    """1 + 7: fio --verify on a phy and a qdisk disk; gblk's metrics account for the IO."""
    a = make_image("fio-a", 256)
    b = make_image("fio-b", 256)
    g = Guest("fio", "fio_verify", [disk_spec("xvda", a, "phy"), disk_spec("xvdb", b, "qdisk")],
              fio=True).create(res)
    before = gblk.metrics()
    g.wait("READY", "metrics")
    res.mark("fio done")
    collect(res, g)
    for qd in (1, 8, 32):
        rep = g.console.json("qd%d" % qd) or {}
        jobs = rep.get("jobs", [])
        res.data["qd%d" % qd] = [{
            "job": j.get("jobname"), "error": j.get("error"),
            "write_bytes": j.get("write", {}).get("io_bytes"),
            "read_bytes": j.get("read", {}).get("io_bytes"),
            "write_iops": j.get("write", {}).get("iops"),
        } for j in jobs]
    # 7: metrics scraped in dom0 while the guest is still connected
    m = Result("metrics")
    try:
        after = gblk.metrics()
        with open(os.path.join(LOGS, "metrics-fio.txt"), "w") as f:
            f.write(gblk.scrape())
        fio_w = {"phy": 0, "qdisk": 0}
        fio_r = {"phy": 0, "qdisk": 0}
        for qd in (1, 8, 32):
            for j in (g.console.json("qd%d" % qd) or {}).get("jobs", []):
                fio_w[j["jobname"]] += j["write"]["io_bytes"]
                fio_r[j["jobname"]] += j["read"]["io_bytes"]
        m.data["fio"] = {"write": fio_w, "read": fio_r}
        for job, dev in (("phy", VDEV["xvda"]), ("qdisk", VDEV["xvdb"])):
            w = metric_sum(after, "gblk_bytes_total", domain=g.domid, device=dev, op="write") - \
                metric_sum(before, "gblk_bytes_total", domain=g.domid, device=dev, op="write")
            r = metric_sum(after, "gblk_bytes_total", domain=g.domid, device=dev, op="read") - \
                metric_sum(before, "gblk_bytes_total", domain=g.domid, device=dev, op="read")
            reqs = metric_sum(after, "gblk_requests_total", domain=g.domid, device=dev)
            errs = metric_sum(after, "gblk_errors_total", domain=g.domid, device=dev)
            flushes = metric_sum(after, "gblk_requests_total", domain=g.domid, device=dev, op="flush")
            m.data[job] = {"gblk_write": w, "gblk_read": r, "requests": reqs, "errors": errs, "flush": flushes}
            m.check("%s-write-bytes" % job, w == fio_w[job], "gblk %d, fio %d" % (w, fio_w[job]))
            m.check("%s-read-bytes" % job, r >= fio_r[job] > 0, "gblk %d, fio %d" % (r, fio_r[job]))
            m.check("%s-no-errors" % job, errs == 0, errs)
            m.check("%s-flushes" % job, flushes > 0, flushes)
            m.check("%s-connected" % job, metric_sum(after, "gblk_device_connected", domain=g.domid, device=dev) == 1)
        g.destroy()
        gone = g.wait_gone(60)
        m.check("guest-gone", gone)
        time.sleep(2)
        left = series_for_domain(gblk.metrics(), g.domid)
        m.check("series-vanish", not left, left[:5])
    except Exception as e:  # noqa: BLE001 - recorded in the result
        m.error = "%s: %s" % (type(e).__name__, e)
        log(traceback.format_exc())
    m.write()
    res.check("guest-done", g.console.count("DONE") == 0 and g.console.count("READY", "metrics") == 1)


def sc_mkfs_fsck(res, gblk):
    """2: mkfs.ext4, copy a tree, fsck -f clean, checksums match after remount."""
    a = make_image("fs", 256)
    g = Guest("fs", "mkfs_fsck", [disk_spec("xvda", a, "phy")]).create(res)
    g.wait("DONE")
    collect(res, g)
    g.finish(res)
    res.check("steps-seen", len(res.steps) >= 8, len(res.steps))


def sc_reboot(res, gblk):
    """3: guest reboot (and a blkfront unbind/bind) -> reconnect -> data intact."""
    a = make_image("reboot", 128)
    g = Guest("reboot", "reboot", [disk_spec("xvda", a, "phy")], reboot="restart").create(res)
    first = g.domid
    g.wait("REBOOTING")
    res.mark("rebooting")
    g.console.wait("BOOT", "second", CONF["timeouts"]["guest"])
    res.mark("second boot")
    g.domid = domid_of(g.name)
    g.wait("DONE")
    res.mark("second boot done")
    collect(res, g)
    g.finish(res)
    res.check("second-boot", g.console.count("BOOT", "second") == 1)
    for step in ("verify-after-reboot",):
        res.check("step-" + step, any(s["name"] == step for s in res.steps), "the guest reported it")
    res.check("old-domain-released", first not in domain_ids(), "domid %d" % first)
    if REFERENCE["phy"] == "gblk":
        res.check("old-series-gone", not series_for_domain(gblk.metrics(), first))


def sc_attach_detach(res, gblk):
    """4: xl block-attach / block-detach of a second gblk disk while the guest runs."""
    a = make_image("hot-a", 128)
    b = make_image("hot-b", 64)
    g = Guest("hotplug", "attach_detach", [disk_spec("xvda", a, "phy")]).create(res)
    g.wait("READY", "attach1")
    t = time.monotonic()
    sh(["xl", "block-attach", g.name, disk_spec("xvdb", b, "phy")], timeout=90)
    res.timings["block-attach 1"] = round(time.monotonic() - t, 1)
    g.wait("READY", "detach")
    t = time.monotonic()
    sh(["xl", "block-detach", g.name, "xvdb"], timeout=90)
    res.timings["block-detach"] = round(time.monotonic() - t, 1)
    bdir = "/local/domain/0/backend/vbd/%d/%d" % (g.domid, VDEV["xvdb"])
    gone = subprocess.call(["xenstore-exists", bdir], stderr=subprocess.DEVNULL, timeout=30) != 0
    res.check("backend-dir-removed", gone, bdir)
    time.sleep(1)
    left = [s for s in series_for_domain(gblk.metrics(), g.domid) if s[1].get("device") == str(VDEV["xvdb"])]
    res.check("detached-series-gone", not left, left[:3])
    g.wait("READY", "attach2")
    t = time.monotonic()
    sh(["xl", "block-attach", g.name, disk_spec("xvdb", b, "phy")], timeout=90)
    res.timings["block-attach 2"] = round(time.monotonic() - t, 1)
    ack(a, "attached2")  # the guest stays up until xl (and its hotplug script) returned
    g.wait("DONE")
    collect(res, g)
    g.finish(res)


def sc_qcow2(res, gblk):
    """issue 11: a qcow2 image (backendtype=qdisk, format=qcow2: libxl writes params
    qcow2:PATH) served through the qemu-nbd gblk starts for it: fio --verify, mkfs + fsck
    and checksums in the guest; qemu-nbd goes with the disk and qemu-img check is clean."""
    path = os.path.join(LAB, "disk.qcow2")
    if os.path.exists(path):
        os.unlink(path)
    sh(["qemu-img", "create", "-q", "-f", "qcow2", path, "256M"], timeout=60)
    spec = "format=qcow2,vdev=xvda,access=rw,backendtype=qdisk,target=%s" % path
    g = Guest("qcow2", "qcow2", [spec], fio=True).create(res)
    g.wait("READY", "served")
    procs = sh(["pgrep", "-a", "qemu-nbd"], check=False, quiet=True).strip().splitlines()
    res.data["qemu_nbd"] = procs
    res.check("one-qemu-nbd", len(procs) == 1 and "--format=qcow2" in procs[0], procs)
    g.wait("DONE")
    collect(res, g)
    rep = g.console.json("verify") or {}
    errors = [j.get("error") for j in rep.get("jobs", [])]
    res.check("fio-no-errors", errors == [0], errors)
    g.finish(res)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sh(["pgrep", "-x", "qemu-nbd"], check=False, quiet=True).strip():
        time.sleep(0.5)
    left = sh(["pgrep", "-a", "qemu-nbd"], check=False, quiet=True).strip()
    res.check("qemu-nbd-stopped", not left, left)
    check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, timeout=120)
    res.check("qemu-img-check", check.returncode == 0, (check.stdout + check.stderr).strip()[-300:])


def sc_restart(res, gblk):
    """issue 10: fio --verify in the guest while gblk is SIGKILLed twice at random moments
    and started again as its unit says, then handed over to a successor by SIGUSR2 (the
    package's upgrade): the guest sees a pause, never an error, and no "Setting
    capacity" (a takeover rewrites nothing blkfront reacts to)."""
    import random

    a = make_image("restart", 128)
    g = Guest("restart", "restart", [disk_spec("xvda", a, "phy")], fio=True).create(res)
    g.wait("READY", "fio")
    pauses = []
    for _ in range(2):
        time.sleep(random.uniform(2, 8))
        pid = gblk.proc.pid
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        gblk.proc.wait(timeout=30)
        gblk.start()  # READY=1 and metrics: the disks are taken over before either
        pauses.append(round(time.monotonic() - t, 1))
        log("restart: gblk %d killed, %d serving after %.1fs" % (pid, gblk.proc.pid, pauses[-1]))
    res.data["restart_seconds"] = pauses
    # the planned restart: the package's upgrade sends SIGUSR2 (debian/handover)
    time.sleep(random.uniform(2, 5))
    handover = gblk.handover()
    res.data["handover"] = handover
    res.check("handover", handover["new_pid"] != handover["old_pid"]
              and handover["served_again_ms"] is not None, handover)
    time.sleep(5)  # the guest's IO goes on after the handover
    ack(a, "stop")
    g.wait("DONE")
    collect(res, g)
    g.finish(res)
    res.check("restarts", len(pauses) == 2, pauses)
    samples = gblk.metrics()
    errs = metric_sum(samples, "gblk_errors_total")
    res.check("no-gblk-errors", errs == 0, errs)


def gblk_ctl(*args, timeout=60):
    """``gblk ctl ARGS`` (the installed gblk, its default control socket): its JSON answer;
    Failure with its error otherwise."""
    p = subprocess.run(["gblk", "ctl"] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    log("$ gblk ctl %s  -> rc=%d\n%s%s" % (" ".join(args), p.returncode, out[-600:], err[-300:]))
    if p.returncode != 0:
        raise Failure("gblk ctl %s: exit %d: %s" % (" ".join(args), p.returncode, err.strip()[-300:]))
    return json.loads(out)


def same_file(a, b):
    """Whether two files hold the same bytes (and the first differing MiB if not)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        n = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False, "first difference in MiB %d" % n
            if not x:
                return True, "%d MiB" % n
            n += 1


def sc_backup(res, gblk):
    """issue 13 on real Xen, as README's "A backup with Debian's qemu-img" gives it, while
    the guest keeps writing xvdb: CBT on, a live export copied with qemu-img convert (the
    full backup), cbt reset, later a second export whose dirty extents (qemu-img map
    x-dirty-bitmap) the packaged gblk-apply-extents copies into the full backup. Each
    backup must equal the disk at its export's point in time byte for byte: for that
    reference, the guest is paused (xl pause) and its rings drained while the image is
    copied and the export made. Then an IO limit set with gblk ctl holds the guest's fio."""
    import shutil

    a = make_image("backup-a", 16)  # the ack channel (wait_ack)
    b = make_image("backup-b", 128)  # the disk backed up
    full = os.path.join(LAB, "backup-full.raw")
    g = Guest("backup", "backup", [disk_spec("xvda", a, "phy"), disk_spec("xvdb", b, "qdisk")],
              fio=True).create(res)
    devid = VDEV["xvdb"]
    disk = "d%d/%d" % (g.domid, devid)
    g.wait("READY", "writing")
    gblk_ctl("cbt", "enable", disk)
    time.sleep(3)  # tracked writes

    def drained():
        m = gblk.metrics()
        return (metric_sum(m, "gblk_requests_in_flight", domain=g.domid, device=devid) == 0
                and metric_sum(m, "gblk_ring_requests_pending", domain=g.domid, device=devid) == 0)

    def point_in_time(tag):
        """Paused and drained: the reference copy, then the export; the guest goes on."""
        sh(["xl", "pause", g.name])
        try:
            deadline = time.monotonic() + 30
            while not drained():
                if time.monotonic() > deadline:
                    raise Failure("xvdb's rings did not drain within 30 s of xl pause")
                time.sleep(0.2)
            ref = os.path.join(LAB, "backup-%s.ref" % tag)
            shutil.copyfile(b, ref)
            exp = gblk_ctl("export", disk)
        finally:
            sh(["xl", "unpause", g.name])
        return ref, exp["socket"]

    def cbw_bytes():
        return metric_sum(gblk.metrics(), "gblk_export_cbw_bytes_total", domain=g.domid, device=devid)

    # the full backup
    ref1, sock = point_in_time("full")
    cbw0 = cbw_bytes()
    t = time.monotonic()
    sh(["qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd+unix:///?socket=" + sock, full], timeout=600)
    res.timings["full backup"] = round(time.monotonic() - t, 1)
    same, why = same_file(full, ref1)
    res.check("full-backup-is-the-point-in-time", same, why)
    res.data["full_cbw_bytes"] = cbw_bytes() - cbw0
    res.check("guest-wrote-during-the-export", cbw_bytes() > cbw0, "%d bytes copied before writes" % (cbw_bytes() - cbw0))
    gblk_ctl("cbt", "reset", disk)
    gblk_ctl("unexport", disk)
    res.check("export-socket-gone", not os.path.exists(sock), sock)
    time.sleep(5)  # the guest changes some blocks

    # the incremental backup
    ref2, sock = point_in_time("incr")
    t = time.monotonic()
    mapped = sh(["qemu-img", "map", "--output=json", "--image-opts",
                 "driver=nbd,path=%s,x-dirty-bitmap=qemu:dirty-bitmap:cbt" % sock], timeout=300, quiet=True)
    extents = json.loads(mapped)
    dirty = sum(e["length"] for e in extents if not e["data"])
    res.data["incremental_dirty_bytes"] = dirty
    res.check("incremental-is-partial", 0 < dirty < os.path.getsize(b), "%d of %d bytes dirty" % (dirty, os.path.getsize(b)))
    apply = subprocess.run(["python3", "/usr/share/doc/gblk/examples/gblk-apply-extents",
                            "nbd+unix:///?socket=" + sock, full], input=mapped.encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    log("gblk-apply-extents: rc=%d %s" % (apply.returncode, apply.stdout.decode("utf-8", "replace")[-500:]))
    res.check("apply-extents", apply.returncode == 0, apply.stdout.decode("utf-8", "replace")[-200:])
    res.timings["incremental backup"] = round(time.monotonic() - t, 1)
    same, why = same_file(full, ref2)
    res.check("incremental-backup-is-the-point-in-time", same, why)
    gblk_ctl("cbt", "reset", disk)
    gblk_ctl("unexport", disk)
    for p in (ref1, ref2, full):
        os.unlink(p)

    # an IO limit, set at runtime
    ack(a, "stop")
    g.wait("READY", "limited")
    limit = 50
    gblk_ctl("limit", disk, "--iops-total", str(limit))
    gblk_ctl("cbt", "disable", disk)  # the bitmap file goes (the disk goes with the guest)
    ack(a, "limited")
    g.wait("DONE")
    collect(res, g)
    g.finish(res)

    def iops(tag):
        rep = g.console.json(tag) or {}
        return sum(j.get("read", {}).get("iops", 0) for j in rep.get("jobs", []))

    free, limited = iops("free"), iops("limited")
    res.data.update({"free_iops": round(free, 1), "limited_iops": round(limited, 1), "iops_limit": limit})
    res.check("limit-held", limited <= limit * 1.1 and free > 1.5 * limit,
              "%.1f IOPS under a limit of %d (%.1f without)" % (limited, limit, free))


def sc_read_only(res, gblk):
    """5: read-only disks (phy and qdisk): the guest sees them read-only, writes fail."""
    a = make_image("ro-a", 64, fill_mib=4)
    b = make_image("ro-b", 64)
    with open(a, "rb") as src, open(b, "r+b") as dst:
        dst.write(src.read(4 * MiB))
    sha = file_sha(a, 4)
    whole = (file_sha(a, 64), file_sha(b, 64))
    g = Guest("ro", "read_only", [disk_spec("xvda", a, "phy", "ro"), disk_spec("xvdb", b, "qdisk", "ro")],
              extra="gblk.sha=%s" % sha).create(res)
    g.wait("DONE")
    collect(res, g)
    g.finish(res)
    res.check("images-unchanged", (file_sha(a, 64), file_sha(b, 64)) == whole)
    res.check("steps-seen", len(res.steps) == 6, len(res.steps))


def ack(path, tag):
    """Answer a guest's ``wait_ack TAG``: "ACK TAG" in the last 4 KiB of its xvda image
    (the guest polls it with O_DIRECT reads through the backend)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 4096)
        f.write(("ACK %s\n" % tag).encode().ljust(4096, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def sc_discard(res, gblk):
    """6: discard from the guest (blkdiscard, fstrim) punches holes in the image files."""
    a = make_image("discard-a", 128)
    b = make_image("discard-b", 128)
    g = Guest("discard", "discard", [disk_spec("xvda", a, "phy"), disk_spec("xvdb", b, "qdisk")]).create(res)
    g.wait("READY", "written")
    res.data["xvda_allocated_after_write"] = allocated(a)
    ack(a, "written")
    g.wait("READY", "fs-written")
    res.data["xvdb_allocated_after_write"] = allocated(b)
    ack(a, "fs-written")
    g.wait("DONE")
    collect(res, g)
    g.finish(res)
    res.data["xvda_allocated_end"] = allocated(a)
    res.data["xvdb_allocated_end"] = allocated(b)
    d = res.data
    res.check("xvda-was-allocated", d["xvda_allocated_after_write"] >= 8 * MiB, d["xvda_allocated_after_write"])
    res.check("xvda-holes-punched", d["xvda_allocated_end"] <= 64 * 1024,
              "%d bytes still allocated after blkdiscard" % d["xvda_allocated_end"])
    res.check("xvdb-holes-punched", d["xvdb_allocated_end"] <= d["xvdb_allocated_after_write"] - 7 * MiB,
              "%d bytes allocated with the 8 MiB file, %d after rm + fstrim"
              % (d["xvdb_allocated_after_write"], d["xvdb_allocated_end"]))


def sc_two_guests(res, gblk):
    """8: two guests x two disks under IO; one destroyed mid-IO; the other unaffected, and
    gblk lets go of everything the destroyed one had."""
    a_img = make_image("pa-a", 128)
    ga = Guest("pair-a", "pair", [disk_spec("xvda", a_img, "phy"),
                                   disk_spec("xvdb", make_image("pa-b", 128), "qdisk")],
               fio=True, memory=384).create(res)
    gb = Guest("pair-b", "pair", [disk_spec("xvda", make_image("pb-a", 128), "phy"),
                                   disk_spec("xvdb", make_image("pb-b", 128), "qdisk")],
               fio=True, memory=384).create(res)
    ga.wait("READY", "io-started")
    gb.wait("READY", "io-started")
    # B has finished a verified pass and is in its next one: destroy it mid-IO
    gb.wait("PASS", "1")
    res.mark("b passed once")
    a_passes = ga.console.count("PASS")
    b_domid = gb.domid
    t = time.monotonic()
    sh(["xl", "destroy", gb.name], timeout=60)
    res.timings["destroy b"] = round(time.monotonic() - t, 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and b_domid in domain_ids():
        time.sleep(0.5)
    released = b_domid not in domain_ids()
    res.timings["b released by Xen"] = round(time.monotonic() - t, 1)
    res.check("b-domain-released", released,
              "Xen let domain %d go %.1fs after xl destroy" % (b_domid, time.monotonic() - t) if released
              else "domain %d still known to Xen 60s after xl destroy (a backend still maps its pages?)" % b_domid)
    for kind, vdev in (("vbd", 51712), ("qdisk", 51728)):
        bdir = "/local/domain/0/backend/%s/%d/%d" % (kind, b_domid, vdev)
        gone = subprocess.call(["xenstore-exists", bdir], stderr=subprocess.DEVNULL, timeout=30) != 0
        res.check("b-%s-backend-removed" % kind, gone, bdir)
    left = series_for_domain(gblk.metrics(), b_domid)
    res.check("b-series-gone", not left, left[:3])
    res.check("gblk-alive", gblk.alive())
    # A keeps going: two more verified passes after B's destruction, then stop
    ga.wait("PASS", timeout=CONF["timeouts"]["guest"], count=a_passes + 2)
    res.mark("a passed twice more")
    res.check("a-io-after-destroy", ga.console.count("PASS") >= a_passes + 2,
              "%d passes before, %d after" % (a_passes, ga.console.count("PASS")))
    ack(a_img, "stop")
    ga.wait("DONE")
    res.steps.extend({"name": "a-" + s["name"], "ok": s["ok"], "detail": s["detail"]} for s in ga.console.steps())
    res.check("a-io-loop", any(s["name"] == "a-io-loop" and s["ok"] for s in res.steps))
    ga.finish(res)
    maps = gblk.gntdev_mappings()
    res.check("no-grant-mappings-left", maps == 0, "%d gntdev mappings in gblk" % maps)
    res.data["b_steps_before_destroy"] = gb.console.steps()
    res.data["passes"] = {"a": ga.console.count("PASS"), "b": gb.console.count("PASS")}


def readme_qdisk_lines():
    """README's ``backendtype=qdisk`` example, verbatim: the lines of the code block that
    holds a qdisk disk line and a ``device_model_override``."""
    with open(os.path.join(SHARE, "README.md")) as f:
        text = f.read()
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        lines = [line for line in block.splitlines() if line.strip()]
        if (any("backendtype=qdisk" in line for line in lines)
                and any(line.startswith("device_model_override") for line in lines)):
            return lines
    raise Failure("README.md has no code block with a backendtype=qdisk disk line and "
                  "device_model_override")


#: where a QEMU for Xen may live in a Debian dom0 (libxl's qemu-xen path and Debian's)
QEMU_GLOBS = ("/usr/bin/qemu-system-*", "/usr/lib/xen-*/bin/qemu-system-*",
              "/usr/libexec/xen/bin/qemu-system-*", "/usr/lib/xen/bin/qemu-system-*")
HIDDEN = ".gblk-hidden"


def qemu_binaries():
    found = set()
    for pattern in QEMU_GLOBS:
        found.update(p for p in glob.glob(pattern) if not p.endswith(HIDDEN))
    return sorted(found)


def hide_qemu(hidden):
    """Rename every QEMU binary away, each added to ``hidden`` as it goes (restore_qemu
    puts them back): dom0 as if QEMU were not installed. The image is booted with
    -snapshot, so a payload killed meanwhile changes nothing for the next boot."""
    for path in qemu_binaries():
        os.rename(path, path + HIDDEN)
        hidden.append(path)


def restore_qemu(hidden):
    for path in hidden:
        if os.path.lexists(path + HIDDEN):
            os.rename(path + HIDDEN, path)


def xs_read(path):
    p = subprocess.run(["xenstore-read", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       timeout=30)
    return p.stdout.decode().strip() if p.returncode == 0 else None


def process_gone(pid):
    """The process has exited (gone, or a zombie nobody reaped yet)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def region_sha(path, offset, size):
    import hashlib
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(size)).hexdigest()


def sc_readme_qdisk(res, gblk):
    """README's backendtype=qdisk lines exactly as written (device_model_override naming
    the package's gblk-device-model), served by the installed gblk.service on the
    configuration file as the package ships it (every key at its default: kinds =
    ["qdisk"]), with no QEMU binary in dom0:
    the guest's writes land in the image, gblk serves the disk, libxl spoke QMP to
    gblk-device-model, which exited when the guest went away."""
    lines = readme_qdisk_lines()
    res.data["config_lines"] = lines
    disk = next(line for line in lines if "backendtype=qdisk" in line)
    target = re.search(r"target=([^,'\"\]]+)", disk).group(1)
    dm = re.search(r'device_model_override\s*=\s*"([^"]+)"', "\n".join(lines)).group(1)
    res.check("override-installed", os.access(dm, os.X_OK), dm)
    with open(PACKAGED_CONFIG) as f:
        packaged = f.read()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target):
        os.unlink(target)
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    suite_gblk = gblk.alive()
    if suite_gblk:
        gblk.stop()  # one backend per kind: the suite's gblk serves qdisk too
    # the package's configuration file as shipped (every key at its default; the metrics
    # address is the suite's, 127.0.0.1:9741), the unit as installed
    use_config(packaged)
    res.check("packaged-configuration", md5_of(CONFIG) == packaged_conffile_md5(),
              "%s is the conffile as the package shipped it" % CONFIG)
    own = Gblk(log_name="gblk-default.log")
    res.logs.append("logs/gblk-default.log")
    hidden = []
    pid = None
    finished = False
    try:
        hide_qemu(hidden)
        res.data["qemu_hidden"] = hidden
        left = qemu_binaries()
        res.check("qemu-absent", not left, "hidden %s, left %s" % (hidden, left))
        own.start()
        g = Guest("readme", "readme", [], config_lines=lines).create(res)
        dm_log = os.path.join(XEN_LOG_DIR, "qemu-dm-%s.log" % g.name)
        g.wait("READY", "served")
        res.mark("served")
        samples = own.metrics()
        connected = metric_sum(samples, "gblk_device_connected", domain=g.domid, device=VDEV["xvda"],
                               kind="qdisk")
        res.check("gblk-serves-the-disk", connected == 1, "gblk_device_connected{kind=qdisk} = %s" % connected)
        written = metric_sum(samples, "gblk_bytes_total", domain=g.domid, device=VDEV["xvda"], op="write")
        res.check("gblk-counted-the-writes", written >= 8 * MiB, "%d bytes" % written)
        pid_text = xs_read("/local/domain/%d/image/device-model-pid" % g.domid) or ""
        pid = int(pid_text) if pid_text.isdigit() else None
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, TypeError):
            cmdline = ""
        res.check("device-model-is-gblk", DEVICE_MODEL in cmdline and "-xen-domid %d" % g.domid in cmdline,
                  "pid %s: %s" % (pid, cmdline[:300]))
        state = xs_read("/local/domain/0/device-model/%d/state" % g.domid)
        res.check("device-model-state-running", state == "running", state)
        sums = [s["detail"] for s in g.console.steps() if s["name"] == "readback" and s["ok"]]
        on_disk = region_sha(target, 1 * MiB, 8 * MiB)
        res.check("image-holds-the-guest-data", sums == [on_disk], "guest %s, image %s" % (sums, on_disk))
        ack(target, "served")
        g.wait("DONE")
        collect(res, g)
        g.finish(res)
        deadline = time.monotonic() + 30
        while pid is not None and not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        res.check("device-model-exited", pid is not None and process_gone(pid), "pid %s" % pid)
        try:
            with open(dm_log) as f:
                text = f.read()
        except OSError as e:
            text = "(%s)" % e
        with open(os.path.join(LOGS, os.path.basename(dm_log)), "w") as f:
            f.write(text)
        res.logs.append("logs/" + os.path.basename(dm_log))
        res.check("libxl-spoke-qmp", "qmp libxl-cmd: qmp_capabilities" in text
                  and "qmp libxl-cmd: query-chardev" in text, dm_log)
        stops = [line for line in text.splitlines() if "stopping on" in line]
        res.check("device-model-stopped-cleanly", bool(stops) and "Traceback" not in text,
                  stops[-1] if stops else text[-300:])
        finished = True
    finally:
        restore_qemu(hidden)
        if own.alive() and not (finished and all(c["ok"] for c in res.checks)):
            try:
                own.dump("readme_qdisk")
            except Exception as e:  # noqa: BLE001 - diagnostics only
                log("gblk: dump failed: %s" % e)
        own.stop()
        use_config(suite_config(packaged))
        if suite_gblk:
            gblk.start()
            res.check("suite-gblk-restarted", gblk.alive())


def dpkg_field(fmt, package="gblk"):
    p = subprocess.run(["dpkg-query", "-W", "-f=" + fmt, package], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    return p.stdout.decode("utf-8", "replace") if p.returncode == 0 else None


def md5_of(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def packaged_conffile_md5():
    """The md5 dpkg recorded for /etc/gblk/gblk.toml (what the package shipped)."""
    for line in (dpkg_field("${Conffiles}") or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == CONFIG:
            return parts[1]
    return None


def suite_config(text):
    """The packaged configuration with the suite's settings (config.json's gblk.settings:
    [daemon] keys), each replacing its line: what an operator does to the conffile."""
    for key, value in CONF["gblk"]["settings"].items():
        line = "%s = %s" % (key, json.dumps(value))
        text, n = re.subn(r"(?m)^%s = .*$" % re.escape(key), line.replace("\\", "\\\\"), text, count=1)
        if n != 1:
            raise Failure("%s has no '%s = ' line to set" % (CONFIG, key))
    return text


def use_config(text):
    with open(CONFIG, "w") as f:
        f.write(text)
    sh(["gblk", "config", "--quiet"], timeout=60)  # what the unit's ExecReload= checks first


def sc_install(res, gblk):
    """The operator's install: `apt-get install ./gblk_<version>_all.deb` with no network
    (its Depends are in the image), then the package's files where Debian puts them, the
    commands running from the package (not the share), `man gblk`, the unit; finally the
    suite's settings written into the conffile."""
    debs = sorted(glob.glob(os.path.join(SHARE, "deb", "gblk_*_all.deb")))
    if len(debs) != 1:
        raise Failure("expected one gblk_*_all.deb in %s/deb, found %s" % (SHARE, debs))
    deb = os.path.basename(debs[0])
    version = deb.split("_")[1]
    res.data["deb"] = deb
    res.check("not-installed-before", dpkg_field("${Status}") in (None, "unknown ok not-installed"),
              dpkg_field("${Status}"))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    t = time.monotonic()
    p = subprocess.run(["apt-get", "install", "-y", "./" + deb], cwd=os.path.dirname(debs[0]),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env=env, timeout=300)
    out = p.stdout.decode("utf-8", "replace")
    res.mark("apt-get install")
    with open(os.path.join(LOGS, "apt-install.txt"), "w") as f:
        f.write(out)
    res.logs.append("logs/apt-install.txt")
    log("install: apt-get install ./%s -> rc=%d (%.1fs)" % (deb, p.returncode, time.monotonic() - t))
    if not res.check("apt-get-install", p.returncode == 0, "exit %d: %s" % (p.returncode, out.strip()[-800:])):
        raise Failure("apt-get install ./%s failed (logs/apt-install.txt)" % deb)
    res.check("nothing-downloaded", "Need to get 0 B" in out and "http" not in out, "offline: every Depends in the image")
    status = dpkg_field("${Status} ${Version}")
    res.check("dpkg-installed", status == "install ok installed " + version, status)
    for path in ("/usr/bin/gblk", "/usr/bin/gblk-xl-hotplug", DEVICE_MODEL):
        res.check("exe " + path, os.access(path, os.X_OK), path)
    link = "/etc/xen/scripts/gblk-xl-hotplug"
    res.check("hotplug-link", os.path.realpath(link) == "/usr/bin/gblk-xl-hotplug",
              "%s -> %s" % (link, os.path.realpath(link)))
    md5 = packaged_conffile_md5()
    res.check("conffile", md5 is not None and md5_of(CONFIG) == md5, "%s md5 %s" % (CONFIG, md5))
    unit = open(service.UNIT).read()
    res.check("unit-runs-the-package", "ExecStart=/usr/bin/gblk serve" in unit and "/usr/local" not in unit,
              service.UNIT)
    res.check("version", sh(["gblk", "--version"]).strip() == "gblk " + version)
    where = sh(["/usr/bin/python3", "-c", "import gblk; print(gblk.__file__)"], quiet=True).strip()
    res.check("imports-the-package", where == "/usr/lib/python3/dist-packages/gblk/__init__.py", where)
    man_env = dict(os.environ, MANWIDTH="100", MANPAGER="cat", PAGER="cat")
    for page in ("gblk", "gblk-xl-hotplug"):
        p = subprocess.run(["man", page], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=man_env, timeout=120)
        text = p.stdout.decode("utf-8", "replace")
        res.check("man " + page, p.returncode == 0 and "GBLK(8)" in text and "gblk serve" in text,
                  "exit %d, %d chars: %s" % (p.returncode, len(text), p.stderr.decode()[-300:]))
    res.mark("checked")
    with open(CONFIG) as f:
        packaged = f.read()
    with open(PACKAGED_CONFIG, "w") as f:
        f.write(packaged)
    use_config(suite_config(packaged))
    res.data["settings"] = CONF["gblk"]["settings"]
    res.check("suite-settings", True, "%s: %s" % (CONFIG, CONF["gblk"]["settings"]))


def sc_service(res, gblk):
    """The unit's contract, on the suite's gblk (running since the install, restarted by
    readme_qdisk): READY=1 and STATUS= from the main process only, watchdog pings closer
    together than WatchdogSec=, ExecReload= (check, then SIGHUP) keeps it serving, and a
    stop as the unit says (SIGTERM) ends it cleanly with STOPPING=1; then it starts again."""
    if not gblk.alive():
        raise Failure("gblk.service is not running")
    svc = gblk.service
    status = svc.status()
    with open(os.path.join(LOGS, "gblk-status.txt"), "w") as f:
        f.write(status)
    res.data["status"] = status
    res.check("ready", svc.ready(), "READY=1 on $NOTIFY_SOCKET")
    res.check("status-line", bool(svc.status_text()), svc.status_text())
    res.check("notify-access-main", not svc.foreign_senders(), svc.foreign_senders())
    pid = gblk.proc.pid
    # gblk pings from its event loop every half WatchdogSec=: wait for one in this run
    deadline = time.monotonic() + 2 * (svc.watchdog_sec or 30)
    while svc.watchdog_gaps()[0] == 0 and gblk.alive() and time.monotonic() < deadline:
        time.sleep(1)
    res.check("watchdog-pings", svc.watchdog_gaps()[0] > 0, "WATCHDOG=1 pings: %d" % svc.watchdog_gaps()[0])
    reload_out = svc.reload()
    res.data["reload"] = [[" ".join(a), rc] for a, rc in reload_out]
    time.sleep(3)
    res.check("reload-keeps-serving", gblk.alive() and gblk.proc.pid == pid and bool(gblk.metrics()),
              reload_out)
    logtext = open(os.path.join(LOGS, gblk.log_name), "rb").read().decode("utf-8", "replace")
    res.check("reload-logged", re.search(r"reloaded: (applied|nothing changed)", logtext) is not None,
              "gblk logs 'reloaded: ...'")
    rc = gblk.stop()
    run = gblk.runs[-1]
    res.data["runs"] = gblk.runs
    res.check("stop-clean", rc == 0 and run["stopping"], "exit %s, STOPPING=1 %s" % (rc, run["stopping"]))
    for i, r in enumerate(gblk.runs):
        limit = svc.watchdog_sec
        res.check("watchdog-run-%d" % i, limit is not None and r["longest_gap"] is not None
                  and r["longest_gap"] < limit,
                  "%d pings, longest gap %s s (WatchdogSec=%s)" % (r["pings"], r["longest_gap"], limit))
        res.check("notify-access-run-%d" % i, not r["foreign_senders"], r["foreign_senders"])
    gblk.start()
    res.check("started-again", gblk.alive())


def sc_pipeline(res, gblk):
    """Pipeline proof without gblk: kernel blkback on a loop device, fio verify in a guest."""
    res.check("gntdev", os.path.exists("/dev/xen/gntdev"))
    res.check("evtchn", os.path.exists("/dev/xen/evtchn"))
    res.check("xenstored", bool(sh(["xenstore-read", "/local/domain/0/name"], check=False).strip()))
    res.check("xl-list", "Domain-0" in sh(["xl", "list"], check=False))
    img = make_image("pipeline", 128)
    loop = sh(["losetup", "--find", "--show", "--direct-io=on", img]).strip()
    g = Guest("pipeline", "pipeline", [disk_spec("xvda", loop, "blkback")], fio=True).create(res)
    g.wait("DONE")
    collect(res, g)
    g.finish(res)
    sh(["losetup", "-d", loop], check=False)


def sc_probe(res, gblk):
    """gblk's real host bindings, the installed package's, imported and opened in dom0
    (no guest)."""
    code = open(os.path.join(SHARE, "dom0", "probe.py")).read()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(["/usr/bin/python3", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env=env, timeout=120)
    out = p.stdout.decode("utf-8", "replace")
    with open(os.path.join(LOGS, "probe.txt"), "w") as f:
        f.write(out)
    for line in out.splitlines():
        if line.startswith("PROBE "):
            _, name, status, detail = (line.split(" ", 3) + [""])[:4]
            res.check(name, status == "ok", detail)
    res.check("probe-exit", p.returncode == 0, p.returncode)


# --- benchmark -------------------------------------------------------------------------

BENCH_JOBS = ("randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32",
              "read-1m-seq", "write-1m-seq")


def bench_one(res, backend, spec, dm):
    g = Guest("bench-" + backend, "bench", [spec], fio=True, memory=448,
              extra="gblk.runtime=%d" % CONF.get("bench_runtime", 10), dm=dm).create(res)
    g.wait("DONE", timeout=CONF["timeouts"]["guest"] + 12 * CONF.get("bench_runtime", 10))
    collect(res, g)
    g.finish(res)
    rows = {}
    for job in BENCH_JOBS:
        rep = g.console.json(job) or {}
        j = (rep.get("jobs") or [{}])[0]
        op = "write" if "write" in job else "read"
        st = j.get(op, {})
        rows[job] = {"iops": st.get("iops"), "mib_s": (st.get("bw_bytes") or 0) / MiB,
                     "lat_mean_us": (st.get("clat_ns", {}).get("mean") or 0) / 1000.0,
                     "error": j.get("error")}
    res.data[backend] = rows


def sc_bench(res, gblk):
    """gblk vs QEMU qdisk vs kernel blkback: same fio jobs, same image, one boot."""
    img = os.path.join(LAB, "bench.img")
    sh(["dd", "if=/dev/urandom", "of=" + img, "bs=1M", "count=256", "status=none"], timeout=300)
    res.mark("image")
    if gblk.alive():
        bench_one(res, "gblk", disk_spec("xvda", img, "phy"), "gblk")
        res.mark("gblk")
        gblk.stop()
    try:
        bench_one(res, "qdisk", disk_spec("xvda", img, "qdisk"), "qemu")
    except Failure as e:
        res.data["qdisk_error"] = str(e)
    res.mark("qdisk")
    sh(["modprobe", "xen-blkback"])
    loop = sh(["losetup", "--find", "--show", "--direct-io=on", img]).strip()
    try:
        bench_one(res, "blkback", disk_spec("xvda", loop, "blkback"), "none")
    except Failure as e:
        res.data["blkback_error"] = str(e)
    res.mark("blkback")
    sh(["losetup", "-d", loop], check=False)


SCENARIOS = {
    "install": sc_install,
    "probe": sc_probe,
    "pipeline": sc_pipeline,
    "fio_verify": sc_fio_verify,
    "mkfs_fsck": sc_mkfs_fsck,
    "reboot": sc_reboot,
    "attach_detach": sc_attach_detach,
    "read_only": sc_read_only,
    "discard": sc_discard,
    "two_guests": sc_two_guests,
    "qcow2": sc_qcow2,
    "restart": sc_restart,
    "backup": sc_backup,
    "readme_qdisk": sc_readme_qdisk,
    "service": sc_service,
    "bench": sc_bench,
}
NEEDS_GBLK = {"fio_verify", "mkfs_fsck", "reboot", "attach_detach", "read_only", "discard", "two_guests",
              "qcow2", "restart", "backup", "service"}


def cleanup_domains():
    for domid, name in domain_ids().items():
        if domid != 0:
            sh(["xl", "destroy", name], timeout=60, check=False)


class OutOfTime(Exception):
    """A scenario ran past its budget (SIGALRM)."""


def _alarm(signum, frame):
    raise OutOfTime("scenario ran past its time budget")


def main():
    signal.signal(signal.SIGALRM, _alarm)
    os.makedirs(LAB, exist_ok=True)
    for variant in ("small", "fio"):
        src = os.path.join(SHARE, "guest", "guest-%s.cpio" % variant)
        if os.path.exists(src):
            sh(["cp", src, os.path.join(LAB, "guest-%s.cpio" % variant)], timeout=120)
    boot = {"uptime_at_payload": float(open("/proc/uptime").read().split()[0]), "scenarios": {}}
    log("payload: scenarios %s" % CONF["scenarios"])
    gblk = Gblk()
    gblk_error = None
    wants_gblk = any(s in NEEDS_GBLK or s == "bench" for s in CONF["scenarios"])
    if wants_gblk and "install" not in CONF["scenarios"]:
        gblk_error = "the package was not installed (no install scenario in this boot)"
    for name in CONF["scenarios"]:
        if name != "install" and wants_gblk and gblk_error is None and gblk.proc is None:
            try:  # once, after the install: the suite's gblk.service
                gblk.start()
            except Exception as e:  # noqa: BLE001 - recorded in every scenario that needs gblk
                gblk_error = "gblk did not start: %s" % e
                log(gblk_error)
            boot["gblk_start"] = round(time.monotonic() - T0, 1)
        res = Result(name)
        log("===== scenario %s" % name)
        base, _, ref = name.partition("@")
        REFERENCE["phy"] = ref or "gblk"
        left = CONF["payload_timeout"] - 60 - (time.monotonic() - T0)
        budget = int(max(10, min(CONF["budgets"].get(name, 300), left)))
        cpu0 = gblk.cpu_seconds() if gblk.alive() else None
        pid0 = gblk.proc.pid if gblk.alive() else None
        signal.alarm(budget)
        try:
            if name in NEEDS_GBLK and gblk_error:
                raise Failure(gblk_error)
            if name in NEEDS_GBLK and not gblk.alive():
                raise Failure("gblk serve is not running (exit %s, see logs/gblk.log)" % gblk.proc.returncode)
            SCENARIOS[base](res, gblk)
            if name in NEEDS_GBLK:
                res.check("gblk-still-running", gblk.alive())
        except Exception as e:  # noqa: BLE001 - recorded in the result
            res.error = "%s: %s" % (type(e).__name__, e)
            log(traceback.format_exc())
        finally:
            signal.alarm(0)
        failed = (res.error is not None or not all(c["ok"] for c in res.checks)
                  or not all(st["ok"] for st in res.steps))
        if failed and gblk.alive():
            try:
                gblk.dump(name)
            except Exception as e:  # noqa: BLE001 - diagnostics only
                log("gblk: dump failed: %s" % e)
        cpu1 = gblk.cpu_seconds() if gblk.alive() else None
        if cpu0 is not None and cpu1 is not None and gblk.proc.pid == pid0:  # not restarted
            res.data["gblk_cpu_seconds"] = round(cpu1 - cpu0, 2)
        try:
            cleanup_domains()
        except Exception as e:  # noqa: BLE001 - recorded in the result
            res.error = res.error or "cleanup: %s" % e
        res.write()
        if name == "install" and failed:
            gblk_error = "the gblk package did not install: %s" % (res.error or "a check failed (install.json)")
        boot["scenarios"][name] = round(time.monotonic() - res.t0, 1)
    if gblk.alive():
        boot["gblk_stop"] = str(gblk.stop())
    boot["total"] = round(time.monotonic() - T0, 1)
    with open(os.path.join(RESULTS, "boot.json"), "w") as f:
        json.dump(boot, f, indent=1)


if __name__ == "__main__":
    main()
