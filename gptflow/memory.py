"""Peak resident memory of a block of work, sampled from /proc (Linux)."""

from __future__ import annotations

import os
import threading


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.bytes = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as f:
                    self.bytes = max(self.bytes, int(f.read().split()[1]) * page)
            except OSError:
                return
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
