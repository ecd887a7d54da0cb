"""What a person sees while a stage runs, and where everything else goes.

``stage_console(stage, ...)`` prints one line when the stage starts, sends the driver's log records
of the stage (INFO and up, every library) to ``<run_dir>/logs/<stage>.log`` instead of the
console (only warnings reach the console), and -- when stderr is not a terminal, where progress
bars turn into thousands of lines -- prints one progress line every ``PROGRESS_EVERY_S`` seconds.
A failure's full trace is written to the log file. On an object-store run folder the log is
written locally first and uploaded when the stage ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Iterator, Optional

from slim_ray import storage

PROGRESS_EVERY_S = float(os.environ.get("SLIM_RAY_PROGRESS_EVERY_S", "30"))
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def console(msg: str) -> None:
    print(f"[slim-ray] {msg}", file=sys.stderr, flush=True)


class StageConsole:
    def __init__(self, stage: str, log_uri: str, local_path: str):
        self.stage = stage
        self.log_uri = log_uri
        self.local_path = local_path
        self.log_path = log_uri  # what error lines name

    def record_failure(self, exc: BaseException) -> None:
        """Append the full trace to the stage's log. A log that cannot be written (a full disk)
        must not replace the stage's own error: then the error line names no log file."""
        try:
            with open(self.local_path, "a") as f:
                f.write(f"\nstage '{self.stage}' failed:\n")
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
        except OSError as e:
            console(f"{self.stage}: could not write the trace to {self.local_path}: {e.strerror}")
            self.log_path = None


def _heartbeat(stage: str, t0: float, stop: threading.Event) -> None:
    while not stop.wait(PROGRESS_EVERY_S):
        console(f"{stage}: running for {time.time() - t0:.0f}s")


@contextlib.contextmanager
def stage_console(stage: str, doc: str, out_dir: str, logs_dir: str) -> Iterator[StageConsole]:
    log_uri = storage.join(logs_dir, f"{stage}.log")
    if storage.is_local(log_uri):
        storage.makedirs(logs_dir)
        local_path = storage.normalize(log_uri)
    else:
        fd, local_path = tempfile.mkstemp(prefix=f"slim_ray-{stage}-", suffix=".log")
        os.close(fd)
    handler = logging.FileHandler(local_path, mode="w")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level or logging.WARNING, logging.INFO))
    # Handlers that were there before (the console) keep showing warnings only.
    raised = [(h, h.level) for h in root.handlers if h is not handler and h.level < logging.WARNING]
    for h, _ in raised:
        h.setLevel(logging.WARNING)
    sc = StageConsole(stage, log_uri, local_path)
    console(f"{stage}: {doc} -> {out_dir} (log: {log_uri})")
    stop = threading.Event()
    beat: Optional[threading.Thread] = None
    if not sys.stderr.isatty():
        beat = threading.Thread(target=_heartbeat, args=(stage, time.time(), stop), daemon=True)
        beat.start()
    try:
        yield sc
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=1)
        root.removeHandler(handler)
        root.setLevel(old_level)
        for h, lvl in raised:
            h.setLevel(lvl)
        handler.close()
        if not storage.is_local(log_uri):
            try:
                with open(local_path, "rb") as f:
                    storage.write_bytes(log_uri, f.read())
            except OSError as e:  # the log must not hide the stage's own outcome
                console(f"{stage}: could not upload the log to {log_uri}: {e}; kept at {local_path}")
                sc.log_path = local_path
            else:
                os.remove(local_path)
