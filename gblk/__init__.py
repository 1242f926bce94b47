"""gblk: a userspace Xen paravirtual block backend (blkif) on gevent."""

__version__ = "0.1.0"
