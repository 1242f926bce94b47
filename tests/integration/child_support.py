"""A second real process for the simulated host's cross-process tests: a Python child
that plays the guest (or a second backend) while the test process plays gblk.

The child imports the test module by name and serves its ``Agent``: one JSON request
``[method, args]`` a line on stdin, one JSON reply a line on stdout, ``{"ok": value}``
or ``{"error": type, "message": text}`` (the parent raises RuntimeError with them).
Only the standard library (and pytest, which this module imports) and the test module
run in the child; nothing of gevent is patched there.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

#: a hang guard for one reply from a child, not a performance assertion
REPLY_DEADLINE = 60.0


def serve(module: str) -> None:
    """The child's main loop: ``module``'s ``Agent`` answers stdin until EOF."""
    agent = importlib.import_module(module).Agent()
    for line in sys.stdin:
        method, args = json.loads(line)
        try:
            reply: Dict[str, Any] = {"ok": getattr(agent, method)(*args)}
        except Exception as e:  # noqa: BLE001 - the parent asserts on it
            reply = {"error": type(e).__name__, "message": str(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _env(module: str) -> Dict[str, str]:
    """This environment, with the gblk under test and the test package importable."""
    import gblk

    top = Path(sys.modules[module].__file__ or "").resolve().parents[module.count(".")]
    roots = [str(Path(gblk.__file__).resolve().parent.parent), str(top)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Child:
    """A Python child process serving the ``Agent`` of test module ``module`` (pass
    the test module's ``__name__``)."""

    def __init__(self, module: str) -> None:
        code = f"import sys\nfrom {__name__} import serve\nserve(sys.argv[1])\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, module],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(module), text=True,
        )

    def send(self, method: str, *args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([method, list(args)]) + "\n")
        self.proc.stdin.flush()

    def reply(self, what: str = "") -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_DEADLINE)
        assert ready, f"child did not answer {what}"
        line = self.proc.stdout.readline()
        assert line, f"child died during {what} (exit {self.proc.poll()})"
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{reply['error']}: {reply['message']}")
        return reply["ok"]

    def call(self, method: str, *args: Any) -> Any:
        self.send(method, *args)
        return self.reply(method)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=REPLY_DEADLINE)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(name="child", scope="module")
def child_fixture(request: pytest.FixtureRequest) -> Iterator[Child]:
    """``child``: one Child serving the requesting test module's ``Agent``, for the
    whole module. A module uses it by importing ``child_fixture``."""
    c = Child(request.module.__name__)
    yield c
    c.close()
