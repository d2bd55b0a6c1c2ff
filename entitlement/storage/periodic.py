"""A maintenance task of a Database, run every few seconds in a daemon thread of its own: SQLite's
WAL checkpoints (storage.db.Checkpointer), PostgreSQL's planner statistics (storage.pgstats).

`run_once` (the subclass's) may also be called by a test or a tool beside the thread, under `_lock`.
A failed run is counted (`failures`) and logged at the 1st, 10th, 100th and every 1000th, the
task's resources are let go (`_close`) and the next run starts afresh: the thread never dies of a
database down or a file gone."""

from __future__ import annotations

import threading
from typing import Any

import structlog

_log = structlog.get_logger("entitlement.storage")


class PeriodicTask:
    FAILED_EVENT = "periodic_task_failed"  # the log event of a failed run (override)

    def __init__(self, every_s: float, thread_name: str) -> None:
        self._every_s = every_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # run_once from a test or a tool, beside the thread
        self.runs = self.failures = 0
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def _start(self) -> None:
        """Start the thread (the subclass's last step of __init__)."""
        self._thread.start()

    def run_once(self) -> Any:
        raise NotImplementedError

    def _close(self) -> None:
        """Let go of what the runs hold (a connection); called under `_lock`."""

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - the next run tries again
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    _log.warning(self.FAILED_EVENT, error=type(exc).__name__, failures=self.failures)
                with self._lock:
                    self._close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            self._close()
