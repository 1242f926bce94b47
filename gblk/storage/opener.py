"""``open_store``: the one place that maps a format of libxl's ``params`` to a store.

It sits above every store module (each of them imports ``base`` for the interface, and
this module imports them), so the package has no import cycle. Blocking, like the stores
it opens: run it in the threadpool.
"""

from __future__ import annotations

from ..errors import StorageError
from .base import SUPPORTED_FORMATS, Store
from .fault import FaultStore
from .nbd import remote_store
from .qemunbd import image_store
from .raw import RawStore


def open_store(fmt: str, path: str, readonly: bool, direct: bool = False) -> Store:
    """Open ``path`` as format ``fmt``; StorageError with a clear message otherwise.
    (``fault``: the test-only fault-injecting store, see ``gblk.storage.fault``;
    refused unless gblk's environment allows it.)"""
    if fmt == "fault":
        return FaultStore(path, readonly=readonly, direct=direct)
    if fmt not in SUPPORTED_FORMATS:
        raise StorageError(
            f"format {fmt!r} of {path} is not supported (gblk serves: {', '.join(SUPPORTED_FORMATS)})"
        )
    if fmt == "raw":
        return RawStore(path, readonly=readonly, direct=direct)
    try:
        if fmt == "nbd":
            return remote_store(path, readonly)
        return image_store(fmt, path, readonly, direct)
    except OSError as e:
        raise StorageError(f"cannot serve {fmt}:{path}: {e.strerror or e}") from None
