"""The dataplane: one greenlet per ring, from event channel to storage and back."""
