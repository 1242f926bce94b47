"""The simulated Xen host itself: its xenstored, memory, grant tables, event channels,
toolstack and blkfront, each checked against what the real one does."""
