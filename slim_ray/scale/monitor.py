"""What a benchmarked command costs: its process tree's CPU and memory, sampled while it runs.

The root process is the driver (``slim-ray <stage>``); with a local Ray its descendants are the
Ray processes (GCS, raylet, workers). PSS splits shared pages (the object store's shared memory)
fairly between the processes that map them, so the summed PSS is the tree's real footprint where
the summed RSS would count the object store once per process.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import psutil


def folder_bytes(path: Optional[str]) -> int:
    """Bytes of the files under a local folder (0 when it does not exist)."""
    total = 0
    if not path or not os.path.isdir(path):
        return 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # removed between the listing and the stat (spilled objects are freed)
                pass
    return total


class TreeMonitor(threading.Thread):
    """Samples a process tree every ``every`` seconds until ``stop()``: peak driver RSS, peak summed
    RSS and PSS of the tree, CPU seconds (each process's last sample, so processes that come and go
    count), and the peak size of an object-spilling folder."""

    def __init__(self, pid: int, every: float = 0.5, spill_dir: Optional[str] = None):
        super().__init__(daemon=True)
        self.pid, self.every, self.spill_dir = pid, every, spill_dir
        self.peak_driver_rss = self.peak_rss = self.peak_pss = self.peak_spill = 0
        self.peak_procs = 0
        self.cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> user+system seconds
        self._halt = threading.Event()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        for p in procs:
            try:
                mi = p.memory_full_info()
                ct = p.cpu_times()
                self.cpu[(p.pid, p.create_time())] = ct.user + ct.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += mi.rss
            pss += getattr(mi, "pss", mi.rss)
            if p.pid == self.pid:
                self.peak_driver_rss = max(self.peak_driver_rss, mi.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))
        if self.spill_dir:
            self.peak_spill = max(self.peak_spill, folder_bytes(self.spill_dir))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    @property
    def cpu_seconds(self) -> float:
        return round(sum(self.cpu.values()), 1)

    def figures(self) -> dict[str, float]:
        mib = 2 ** 20
        return {"cpu_s": self.cpu_seconds, "driver_rss_mib": round(self.peak_driver_rss / mib, 1),
                "tree_rss_mib": round(self.peak_rss / mib, 1), "tree_pss_mib": round(self.peak_pss / mib, 1),
                "spill_mib": round(self.peak_spill / mib, 1), "processes": self.peak_procs}
