"""A Linux-like guest: the blkfront (``frontend``: negotiation, IO; ``hooks``: a
hostile guest's tools), its ring (``ring``), the shadow copy that checks every byte
(``verify``), its value types (``values``), the verified workload (``workload``) and
the lean bench guest (``bench_guest``)."""
