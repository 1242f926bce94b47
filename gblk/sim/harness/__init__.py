"""Putting a host together for tests, ``gblk demo`` and ``gblk bench``: ``SimHost``
(``host``: xenstored, toolstack, guests, the daemon as a process), kills and
restarts of the daemon (``restarts``), the many-disk scenario (``scale``) and tmpfs
directories (``ramdir``)."""
