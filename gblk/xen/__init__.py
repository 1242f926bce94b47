"""The host interface: grant tables, event channels, XenStore, memory fences.

``interfaces`` defines what the engine and control plane may use; the real
implementations (cffi over libxengnttab/libxenevtchn, gblk's own XenStore client) live
beside it, the simulated ones in ``gblk.sim``. Library errors become
``gblk.errors`` exceptions here and nowhere else.
"""
