"""The real-Xen system suite: Xen + Debian dom0 under QEMU, Linux blkfront guests
(see docs/testing.md)."""
