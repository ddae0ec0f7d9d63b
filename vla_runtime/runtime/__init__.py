"""Control loop (sync/async), action-chunk queue, timing, metrics, reports."""
