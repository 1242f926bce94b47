"""Builds (and caches) the images the real-Xen system suite boots: host side only.

From Debian packages only (this machine's own apt mirror), nothing fetched from anywhere
else and nothing written into the repository:

- ``xen``: Debian's Xen 4.17 hypervisor, uncompressed (QEMU's multiboot loader wants ELF);
- ``vmlinuz`` + ``initrd.img``: Debian 12's kernel, for dom0 and (the same file) the guests;
- ``dom0.ext4``: a debootstrap'd Debian 12 with Xen's tools, qemu-system-xen and the
  Python packages gblk runs on (``image/packages.txt``), made with ``mkfs.ext4 -d`` (no loop
  mounts); its init (``image/dom0-stub-init``) only mounts the host share and runs the
  per-boot init found there, so scenarios change without a rebuild;
- ``guest-base.cpio`` (static busybox, xen-blkfront and ext4 modules, e2fsprogs,
  blkdiscard/fstrim/blockdev with their libraries) and ``guest-fio.cpio`` (fio and the
  libraries the base lacks): concatenated by the runner with a small per-boot archive
  holding the guest's init, into one guest initramfs.

The result lives in ``~/.cache/gblk-system/<key>/`` where ``key`` hashes this file, lab.py
and ``image/*``; it is built in a temporary directory and renamed into place, so a killed
build never leaves a half-made image behind. Every external command has a hard time limit.

Must not: touch the repository, run anything from the repository inside the chroot, or
depend on gblk being importable.

Usage: ``python3 tests/system/build.py [--force]`` prints the image directory.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

try:  # run as a script (python3 tests/system/build.py) or imported from the package
    from . import lab
except ImportError:  # pragma: no cover - script mode
    import lab  # type: ignore[no-redef]

IMAGE_FILES = ("xen", "vmlinuz", "initrd.img", "dom0.ext4", "guest-base.cpio", "guest-fio.cpio")

#: host commands the builder and runner need, and the Debian packages that provide them
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "zstd": "zstd",
    "timeout": "coreutils",
}
STATIC_BUSYBOX = Path("/bin/busybox")  # from busybox-static

#: modules the guests load (dependencies are added from modules.dep)
GUEST_MODULES = ("xen-blkfront", "ext4", "crc32c_generic")
#: binaries copied into the guest base image, with their libraries (paths inside dom0's root)
GUEST_BASE_BINARIES = (
    "/usr/sbin/mke2fs",
    "/usr/sbin/e2fsck",
    "/usr/sbin/blkdiscard",
    "/usr/sbin/fstrim",
    "/usr/sbin/blockdev",
)
GUEST_FIO_BINARIES = ("/usr/bin/fio",)

MULTIARCH = "usr/lib/x86_64-linux-gnu"

# hard time limits (seconds) for each step
T_DEBOOTSTRAP = 900
T_APT_UPDATE = 300
T_APT_INSTALL = 1500
T_SMALL = 120
T_MKFS = 600


def input_files() -> List[Path]:
    """Everything whose content decides what the images contain."""
    files = [Path(__file__).resolve(), lab.HERE / "lab.py"]
    files += sorted(p for p in (lab.HERE / "image").iterdir() if p.is_file())
    return files


def cache_key() -> str:
    h = hashlib.sha256()
    for path in input_files():
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def packages() -> List[str]:
    out: List[str] = []
    for line in (lab.HERE / "image" / "packages.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        out += line.split()
    return out


def check_host() -> None:
    """Fail early, with one line naming the Debian packages to install."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not STATIC_BUSYBOX.exists() or "statically linked" not in _file_kind(STATIC_BUSYBOX):
        missing.append("busybox-static")
    if missing:
        raise lab.StepError("host packages missing: apt-get install " + " ".join(missing))
    if os.geteuid() != 0:
        raise lab.StepError("the image builder needs root (debootstrap, chroot, mount)")


def _file_kind(path: Path) -> str:
    # /bin/busybox from busybox-static has no PT_INTERP program header; read the ELF header.
    data = path.read_bytes()[:4096]
    if data[:4] != b"\x7fELF":
        return "not elf"
    return "dynamically linked" if b"/lib64/ld-linux" in path.read_bytes() else "statically linked"


# --- apt sources ---------------------------------------------------------------------------


def apt_mirrors() -> Tuple[str, str]:
    """(debian mirror, security mirror) as this machine's apt uses them."""
    main: Optional[str] = None
    security: Optional[str] = None
    entries: List[Tuple[str, List[str]]] = []
    src_dir = Path("/etc/apt/sources.list.d")
    one_line = [Path("/etc/apt/sources.list")] + sorted(src_dir.glob("*.list"))
    for path in one_line:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 3 and parts[0] == "deb":
                if parts[1].startswith("["):
                    parts = [parts[0]] + [p for p in parts[1:] if not ("=" in p or p in "[]")]
                    parts = [p.strip("[]") for p in parts]
                entries.append((parts[1], [parts[2]]))
    for path in sorted(src_dir.glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: Dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    for uri, suites in entries:
        if main is None and "bookworm" in suites:
            main = uri
        if security is None and any(s.startswith("bookworm-security") or s == "bookworm/updates" for s in suites):
            security = uri
    main = main or "http://deb.debian.org/debian"
    security = security or "http://deb.debian.org/debian-security"
    return main.rstrip("/"), security.rstrip("/")


# --- the build -----------------------------------------------------------------------------


class Builder:
    def __init__(self, workdir: Path, logfile: Path) -> None:
        self.work = workdir
        self.root = workdir / "rootfs"
        self.logfile = logfile
        self.timings: Dict[str, float] = {}
        self.env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8", LANG="C.UTF-8")
        self.env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
        self.mounted: List[Path] = []

    def step(self, name: str, argv: List[str], timeout: float) -> None:
        t0 = time.monotonic()
        lab.log(f"build: {name}")
        lab.run(argv, timeout=timeout, step=f"build {name}", env=self.env, logfile=self.logfile)
        self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0

    def chroot(self, name: str, shell: str, timeout: float) -> None:
        self.step(name, ["chroot", str(self.root), "/bin/sh", "-ec", shell], timeout)

    def mount_api(self) -> None:
        for fs, where in (("proc", "proc"), ("sysfs", "sys")):
            target = self.root / where
            target.mkdir(exist_ok=True)
            lab.run(["mount", "-t", fs, fs, str(target)], timeout=30, step="mount " + where)
            self.mounted.append(target)

    def unmount_all(self) -> None:
        for target in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(target)], check=False, timeout=60)
        self.mounted.clear()

    # -- dom0 root --

    def debootstrap(self, apt_cache: Path) -> None:
        main, _ = apt_mirrors()
        apt_cache.mkdir(parents=True, exist_ok=True)
        self.step(
            "debootstrap",
            [
                "debootstrap", "--variant=minbase", f"--cache-dir={apt_cache}",
                "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
                "bookworm", str(self.root), main,
            ],
            T_DEBOOTSTRAP,
        )

    def install_packages(self, apt_cache: Path) -> None:
        main, security = apt_mirrors()
        (self.root / "etc/apt/sources.list").write_text(
            f"deb {main} bookworm main\n"
            f"deb {main} bookworm-updates main\n"
            f"deb {security} bookworm-security main\n"
        )
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        # dom0's initramfs only needs to find a virtio disk; keep it small (boots faster)
        conf = self.root / "etc/initramfs-tools/conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "gblk-lab.conf").write_text("MODULES=list\nCOMPRESS=gzip\n")
        mods = self.root / "etc/initramfs-tools/modules"
        mods.parent.mkdir(parents=True, exist_ok=True)
        mods.write_text("virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n")
        archives = self.root / "var/cache/apt/archives"
        archives.mkdir(parents=True, exist_ok=True)
        self.mount_api()
        lab.run(["mount", "--bind", str(apt_cache), str(archives)], timeout=30, step="bind apt cache")
        self.mounted.append(archives)
        try:
            self.chroot("apt-get update", "apt-get -q update", T_APT_UPDATE)
            self.chroot(
                "apt-get install",
                "apt-get -q -y --no-install-recommends -o Dpkg::Options::=--force-confdef "
                "install " + " ".join(packages()),
                T_APT_INSTALL,
            )
        finally:
            self.unmount_all()
        policy.unlink()

    def configure_dom0(self) -> None:
        init = self.root / "usr/sbin/gblk-lab-init"
        shutil.copy(lab.HERE / "image" / "dom0-stub-init", init)
        init.chmod(0o755)
        (self.root / "etc/hostname").write_text("gblk-dom0\n")
        (self.root / "etc/fstab").write_text("# mounted by /usr/sbin/gblk-lab-init\n")
        (self.root / "mnt/share").mkdir(parents=True, exist_ok=True)
        # shrink: package caches, docs and locales are dead weight in a test image
        for sub in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
            path = self.root / sub
            if path.exists():
                shutil.rmtree(path)
                path.mkdir()

    # -- boot files --

    def kernel_version(self) -> str:
        versions = sorted(p.name for p in (self.root / "lib/modules").iterdir())
        if len(versions) != 1:
            raise lab.StepError(f"expected one kernel in the image, found {versions}")
        return versions[0]

    def boot_files(self, out: Path) -> Dict[str, str]:
        t0 = time.monotonic()
        kver = self.kernel_version()
        boot = self.root / "boot"
        shutil.copy(boot / f"vmlinuz-{kver}", out / "vmlinuz")
        shutil.copy(boot / f"initrd.img-{kver}", out / "initrd.img")
        xen_gz = sorted(boot.glob("xen-4.17*.gz"))
        if not xen_gz:
            raise lab.StepError("build boot files: no /boot/xen-4.17*.gz in the image")
        with gzip.open(xen_gz[-1], "rb") as src, open(out / "xen", "wb") as dst:
            shutil.copyfileobj(src, dst)
        self.timings["boot files"] = time.monotonic() - t0
        return {"kernel": kver, "xen": xen_gz[-1].name}

    # -- guest images --

    def _resolve(self, path: str) -> Path:
        """``path`` inside the chroot, symlinks followed inside the chroot."""
        parts = [p for p in path.split("/") if p]
        cur = self.root
        hops = 0
        while parts:
            cur = cur / parts.pop(0)
            if cur.is_symlink():
                hops += 1
                if hops > 40:
                    raise lab.StepError(f"symlink loop at {path}")
                target = os.readlink(cur)
                rest = [p for p in target.split("/") if p]
                if target.startswith("/"):
                    cur = self.root
                else:
                    cur = cur.parent
                parts = rest + parts
        return cur

    def libraries(self, binary: str) -> List[str]:
        """Absolute in-chroot paths of the loader and libraries ``binary`` needs (ldd)."""
        out = lab.run(
            ["chroot", str(self.root), "/usr/bin/ldd", binary],
            timeout=T_SMALL, step=f"ldd {binary}", env=self.env, capture=True,
        )
        libs: List[str] = []
        for line in out.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].strip().split(" ")[0]
                if target.startswith("/"):
                    libs.append(target)
                elif "not found" in line:
                    raise lab.StepError(f"ldd {binary}: {line}")
            elif line.startswith("/"):
                libs.append(line.split(" ")[0])
        return libs

    def _add_binaries(self, cpio: lab.Cpio, binaries: Tuple[str, ...]) -> None:
        for binary in binaries:
            name = binary.lstrip("/")
            cpio.copy(name, self._resolve(binary), 0o755)
            for lib in self.libraries(binary):
                base = os.path.basename(lib)
                dest = "usr/lib64/" + base if base.startswith("ld-linux") else f"{MULTIARCH}/{base}"
                if not cpio.has(dest):
                    cpio.copy(dest, self._resolve(lib), 0o755)

    def _guest_layout(self, cpio: lab.Cpio) -> None:
        for d in ("usr/bin", "usr/sbin", MULTIARCH, "usr/lib64", "etc", "proc", "sys", "dev", "tmp", "mnt", "run"):
            cpio.mkdir(d)
        for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            cpio.symlink(link, target)

    def guest_modules(self, kver: str) -> List[str]:
        """Module files (relative to /lib/modules/<kver>) in load order, deps first."""
        moddir = self.root / "lib/modules" / kver
        deps: Dict[str, List[str]] = {}
        for line in (moddir / "modules.dep").read_text().splitlines():
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
        by_name: Dict[str, str] = {}
        for mod in deps:
            base = os.path.basename(mod).split(".ko")[0]
            by_name[base.replace("-", "_")] = mod
        builtin = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
        order: List[str] = []
        seen: Set[str] = set()

        def visit(mod: str) -> None:
            if mod in seen:
                return
            seen.add(mod)
            for dep in deps.get(mod, []):
                visit(dep)
            order.append(mod)

        for name in GUEST_MODULES:
            key = name.replace("-", "_")
            if key in by_name:
                visit(by_name[key])
            elif f"/{name}.ko" not in builtin and f"/{name.replace('_', '-')}.ko" not in builtin:
                raise lab.StepError(f"guest module {name} is neither a module nor built in")
        return order

    def guest_images(self, out: Path, kver: str) -> Dict[str, object]:
        t0 = time.monotonic()
        base = lab.Cpio()
        self._guest_layout(base)
        base.copy("usr/bin/busybox", STATIC_BUSYBOX, 0o755)
        self._add_binaries(base, GUEST_BASE_BINARIES)
        for link in ("mkfs.ext4", "mkfs.ext2"):
            base.symlink(f"usr/sbin/{link}", "mke2fs")
        for link in ("fsck.ext4", "e2fsck.ext4"):
            base.symlink(f"usr/sbin/{link}", "e2fsck")
        base.copy("etc/mke2fs.conf", self.root / "etc/mke2fs.conf")
        # busybox applets for everything not provided by a real binary above
        applets = subprocess.run(
            [str(STATIC_BUSYBOX), "--list-full"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        for applet in applets:
            name = os.path.basename(applet)
            if applet == "linuxrc" or name == "busybox":
                continue
            dest = ("usr/sbin/" if "sbin/" in applet else "usr/bin/") + name
            other = ("usr/bin/" if dest.startswith("usr/sbin") else "usr/sbin/") + name
            if not base.has(dest) and not base.has(other):
                base.symlink(dest, "/usr/bin/busybox")
        modules = self.guest_modules(kver)
        moddir = self.root / "lib/modules" / kver
        loaded: List[str] = []
        for mod in modules:
            data = (moddir / mod).read_bytes()
            if mod.endswith(".xz"):
                data = lzma.decompress(data)
            elif mod.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True, timeout=60).stdout
            name = "lib/modules/" + os.path.basename(mod).split(".ko")[0] + ".ko"
            base.file(name, data)
            loaded.append("/" + name)
        base.file("etc/gblk-modules", ("\n".join(loaded) + "\n").encode())
        with open(out / "guest-base.cpio", "wb") as f:
            base.write(f)

        fio = lab.Cpio()
        for binary in GUEST_FIO_BINARIES:
            fio.copy(binary.lstrip("/"), self._resolve(binary), 0o755)
            for lib in self.libraries(binary):
                name = os.path.basename(lib)
                dest = "usr/lib64/" + name if name.startswith("ld-linux") else f"{MULTIARCH}/{name}"
                if not base.has(dest) and not fio.has(dest):
                    fio.copy(dest, self._resolve(lib), 0o755)
        with open(out / "guest-fio.cpio", "wb") as f:
            fio.write(f)
        self.timings["guest images"] = time.monotonic() - t0
        return {"modules": modules}

    def dom0_image(self, out: Path) -> int:
        du = lab.run(["du", "-sxm", str(self.root)], timeout=T_SMALL, step="du", capture=True)
        used_mb = int(du.split()[0])
        size_mb = used_mb + 2048  # room for the scenarios' disk images (sparse, punched)
        self.step(
            "mkfs.ext4 -d",
            ["mkfs.ext4", "-q", "-F", "-L", "gblk-dom0", "-d", str(self.root), str(out / "dom0.ext4"), f"{size_mb}M"],
            T_MKFS,
        )
        return size_mb


def _newest_complete(root: Path, key: str) -> Optional[Path]:
    path = root / key
    if (path / "manifest.json").exists() and all((path / f).exists() for f in IMAGE_FILES):
        return path
    return None


def ensure_images(force: bool = False, keep_rootfs: bool = False) -> Path:
    """The image directory for the current inputs, built if missing (cached otherwise)."""
    root = lab.CACHE_ROOT
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key()
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = _newest_complete(root, key)
        if done is not None and not force:
            lab.log(f"build: cached images {done}")
            return done
        check_host()
        work = root / f".tmp-{key}-{os.getpid()}"
        if work.exists():
            shutil.rmtree(work)
        out = work / "images"
        out.mkdir(parents=True)
        logfile = work / "build.log"
        builder = Builder(work, logfile)
        t0 = time.monotonic()
        try:
            builder.debootstrap(root / "apt-archives")
            builder.install_packages(root / "apt-archives")
            builder.configure_dom0()
            info = builder.boot_files(out)
            guest = builder.guest_images(out, info["kernel"])
            size_mb = builder.dom0_image(out)
        except BaseException:
            builder.unmount_all()
            lab.log(f"build: failed; log kept in {logfile}")
            raise
        manifest = {
            "key": key,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.monotonic() - t0, 1),
            "timings": {k: round(v, 1) for k, v in builder.timings.items()},
            "kernel": info["kernel"],
            "xen": info["xen"],
            "dom0_mb": size_mb,
            "guest_modules": guest["modules"],
            "packages": packages(),
            "mirrors": list(apt_mirrors()),
            "sizes": {f: (out / f).stat().st_size for f in IMAGE_FILES},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.copy(logfile, out / "build.log")
        if keep_rootfs:
            os.replace(builder.root, root / f"rootfs-{key}")
        final = root / key
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
        shutil.rmtree(work, ignore_errors=True)
        # older keys are 2+ GB each: keep only the current one
        for other in root.iterdir():
            if other.name not in (key, "apt-archives", ".lock", f"rootfs-{key}") and not other.name.startswith(".tmp-"):
                shutil.rmtree(other, ignore_errors=True)
        lab.log(f"build: done in {manifest['seconds']} s: {final}")
        return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--keep-rootfs", action="store_true", help="keep the dom0 root tree (debugging)")
    parser.add_argument("--key", action="store_true", help="print the cache key and exit")
    args = parser.parse_args()
    if args.key:
        print(cache_key())
        return
    print(ensure_images(force=args.force, keep_rootfs=args.keep_rootfs))


if __name__ == "__main__":
    main()
