"""The blkif protocol, pure: bytes in, values out.

Constants, one struct table per ABI, request parsing and validation, response
packing, ring index arithmetic and notification rules over any writable buffer,
XenStore node names and negotiation (both halves: what each side writes and how the
other reads it, ``xenbus``), the error reasons failures count under (``reasons``).
Must not import gevent, os, pyxs or cffi, nor any other gblk layer but ``gblk.errors``.
"""
