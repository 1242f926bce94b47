"""Backing stores. Blocking calls only, meant to run in gevent's threadpool: no
gevent, no logging, no metrics inside. Errors are ``OSError`` (IO) or
``gblk.errors.StorageError`` (cannot serve this store as configured)."""

from .base import Store
from .opener import open_store

__all__ = ["Store", "open_store"]
