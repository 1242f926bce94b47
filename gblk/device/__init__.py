"""The control plane: the XenBus state machine (pure), one object per virtual disk
owning its rings, and the bus that watches ``backend/<kind>`` for disks."""
