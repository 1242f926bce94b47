"""A simulated Xen host in userspace: XenStore, guest memory and grant tables,
event channels, a toolstack and a Linux-like blkfront guest.

Used by the tests, ``gblk demo`` and ``gblk bench``; ``gblk serve --xen sim:DIR``
attaches to one. Implements ``gblk.xen.interfaces``; may use ``gblk.blkif``; must not
import the engine, device, daemon or cli layers.
"""
