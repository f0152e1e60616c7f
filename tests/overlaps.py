"""A probe for thread tests: how many threads are inside a call at once."""

from __future__ import annotations

import threading
import time


class Overlaps:
    """Counts how many threads are inside a wrapped call at once (each call sleeps, which
    releases the GIL, so unserialised calls do overlap)."""

    def __init__(self):
        self.inside = self.most = 0
        self.guard = threading.Lock()

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            with self.guard:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.002)
            try:
                return fn(*args, **kwargs)
            finally:
                with self.guard:
                    self.inside -= 1

        return wrapped
