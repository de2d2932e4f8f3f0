"""Progress lines a person can plan with: done out of the total, the rate, and an ETA.

``progress_line`` formats one line (pure); ``StageProgress`` counts one long stage (explain,
faithfulness, importance, sanity) in one worker process and logs a note when the stage starts, a
progress line at most every ``every_s`` seconds, and a note when the stage's share is done.

Beam runs the stages in this process (FnApiRunner) or in ``direct_num_workers`` processes
(multi_processing): each process then sees about 1/workers of the examples, so its share (not
the whole total) is what its ETA is computed on. A total the launcher cannot know up front (a
TFRecord glob, Dataflow) is printed as "total unknown", without an ETA.
"""
import logging
import math
import threading
import time
from typing import Optional

LOG = logging.getLogger("xai_audit")


def format_duration(seconds: float) -> str:
    """42 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def worker_share(total: Optional[int], workers: int) -> Optional[int]:
    """About how many of ``total`` one of ``workers`` processes handles (None: unknown)."""
    if not total or workers < 1:
        return None
    return math.ceil(total / workers)


def progress_line(stage: str, done: int, total: Optional[int], elapsed_s: float,
                  unit: str = "examples", rate_unit: str = "images/s", workers: int = 1) -> str:
    """``Explain: 160 of 480 examples (33%), 14.2 images/s, ETA 23 s``; without a total:
    ``Explain: 160 examples (total unknown), 14.2 images/s``."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    share = worker_share(total, workers)
    if share is None:
        return f"{stage}: {done} {unit} (total unknown), {rate:.1f} {rate_unit}"
    where = f" on this worker (of {total} over {workers} processes)" if workers > 1 else ""
    left = max(0, share - done)
    eta = format_duration(left / rate) if rate > 0 else "unknown"
    return (f"{stage}: {done} of {share} {unit}{where} ({min(100, 100 * done // share)}%), "
            f"{rate:.1f} {rate_unit}, ETA {eta}")


class StageProgress:
    """Counts one stage in one process (thread-safe: DoFn instances on threads share it)."""

    def __init__(self, stage: str, total: Optional[int], every_s: float = 10.0,
                 unit: str = "examples", rate_unit: str = "images/s", workers: int = 1):
        self.stage, self.total, self.every_s = stage, total, every_s
        self.unit, self.rate_unit, self.workers = unit, rate_unit, workers
        self.share = worker_share(total, workers)
        self.done = 0
        self.start = self.last = None
        self.finished = False
        self.lock = threading.Lock()

    def begin(self) -> None:
        """The stage's clock starts at its first piece of work (call before doing it)."""
        with self.lock:
            self._begin(time.perf_counter())

    def _begin(self, now: float) -> None:
        if self.start is None:
            self.start = self.last = now
            to_go = (f"{self.share} {self.unit} to go" if self.share
                     else f"{self.unit}: total unknown")
            if self.share and self.workers > 1:
                to_go += f" on this worker, of {self.total} over {self.workers} processes"
            LOG.info("%s: started (%s).", self.stage, to_go)

    def add(self, n: int) -> None:
        """``n`` more done (a batch, a shard, a method)."""
        with self.lock:
            now = time.perf_counter()
            self._begin(now)
            self.done += n
            if self.share and self.done >= self.share:
                self._finish(now)
            elif now - self.last >= self.every_s:
                self.last = now
                LOG.info("%s", progress_line(self.stage, self.done, self.total, now - self.start,
                                             self.unit, self.rate_unit, self.workers))

    def finish(self) -> None:
        """The stage is over before its count reached the total (a sampled stage whose sample
        came out smaller than expected): the end note now, if it started and is not done."""
        with self.lock:
            if self.start is not None:
                self._finish(time.perf_counter())

    def _finish(self, now: float) -> None:
        if self.finished:
            return
        self.finished = True
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        LOG.info("%s: finished, %d %s in %s (%.1f %s).", self.stage, self.done, self.unit,
                 format_duration(elapsed), rate, self.rate_unit)
