"""Shared helpers of the real-Xen system suite (host side): paths, a cpio writer, timed commands.

Used by ``build.py`` (image builder), ``runner.py`` (boots Xen under QEMU) and the pytest
fixtures. Runs on the host only (never in dom0 or a guest); imports nothing from gblk, so
the builder works even when the package under test does not import.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

#: where built images live (outside the repository), one directory per input hash
CACHE_ROOT = Path(os.environ.get("GBLK_SYSTEM_CACHE", str(Path.home() / ".cache" / "gblk-system")))


class StepError(RuntimeError):
    """A build or boot step failed or ran out of time; the message names the step."""


def log(msg: str) -> None:
    """One progress line on stderr, with a wall-clock stamp (pytest shows it with -s)."""
    sys.stderr.write(time.strftime("[%H:%M:%S] ") + msg + "\n")
    sys.stderr.flush()


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    step: str,
    cwd: Optional[Path] = None,
    env: Optional[Dict[str, str]] = None,
    logfile: Optional[Path] = None,
    capture: bool = False,
    input_bytes: Optional[bytes] = None,
) -> str:
    """Run one command with a hard time limit; raise StepError naming ``step`` on failure.

    Output goes to ``logfile`` (appended) or is captured and returned when ``capture``.
    The command gets its own process group, killed whole on timeout.
    """
    cmd = [str(a) for a in argv]
    out: Optional[BinaryIO] = None
    if logfile is not None and not capture:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        out = open(logfile, "ab")
        out.write(("\n$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
        out.flush()
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=str(cwd) if cwd else None,
            env=env,
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else (out if out is not None else subprocess.DEVNULL),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(input=input_bytes, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise StepError(f"{step}: timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
        text = stdout.decode("utf-8", "replace") if stdout is not None else ""
        if proc.returncode != 0:
            tail = text[-3000:] if capture else _tail(logfile)
            raise StepError(f"{step}: exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
        return text
    finally:
        if out is not None:
            out.close()


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Optional[Path], size: int = 3000) -> str:
    if path is None or not path.exists():
        return ""
    data = path.read_bytes()[-size:]
    return data.decode("utf-8", "replace")


# --- cpio (newc), enough for an initramfs: directories, regular files, symlinks -------------


class Cpio:
    """Writes a newc cpio archive (what the Linux initramfs unpacker reads).

    Entries are added by archive path; parent directories are created as needed and every
    path is written once (the last one wins is *not* what the kernel does, so we refuse
    duplicates instead)."""

    def __init__(self) -> None:
        self._entries: Dict[str, Tuple[int, bytes]] = {}
        self._order: List[str] = []

    def _add(self, name: str, mode: int, data: bytes) -> None:
        name = name.strip("/")
        parent = os.path.dirname(name)
        if parent and parent not in self._entries:
            self.mkdir(parent)
        if name in self._entries:
            old_mode = self._entries[name][0]
            if stat.S_ISDIR(old_mode) and stat.S_ISDIR(mode):
                return
            if self._entries[name] == (mode, data):
                return
            raise ValueError(f"cpio: {name} added twice")
        self._entries[name] = (mode, data)
        self._order.append(name)

    def mkdir(self, name: str, perm: int = 0o755) -> None:
        self._add(name, stat.S_IFDIR | perm, b"")

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | perm, data)

    def copy(self, name: str, src: Path, perm: Optional[int] = None) -> None:
        """Add the content of ``src`` (symlinks followed) under ``name``."""
        st = src.stat()
        self.file(name, src.read_bytes(), perm if perm is not None else (st.st_mode & 0o7777))

    def symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def has(self, name: str) -> bool:
        return name.strip("/") in self._entries

    def names(self) -> Iterable[str]:
        return list(self._order)

    def write(self, out: BinaryIO) -> None:
        ino = 1
        for name in self._order:
            mode, data = self._entries[name]
            self._entry(out, ino, name, mode, data)
            ino += 1
        self._entry(out, 0, "TRAILER!!!", 0, b"")
        pos = out.tell()
        if pos % 512:
            out.write(b"\0" * (512 - pos % 512))

    @staticmethod
    def _entry(out: BinaryIO, ino: int, name: str, mode: int, data: bytes) -> None:
        nameb = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + nameb)
        pad = (4 - (len(header) + len(nameb)) % 4) % 4
        out.write(b"\0" * pad)
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
