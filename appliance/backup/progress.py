"""Progress of a file-tree backup, within files as well as across them.

Workers read files in other processes, and a batch's result comes back only when all its files
are read: a backup of one large file used to report nothing until the file ended. Each worker
now adds the bytes it reads to one shared counter (:class:`ReadMeter`), in steps of
:data:`STEP_BYTES` (a lock taken every few MiB, not per chunk) and at the end of each batch; the
main process waits for batches in slices of :data:`REPORT_SECONDS` and reports in between.

:class:`ProgressTotals` turns what is known into the reported numbers: ``bytes_done`` (files
reused plus bytes the workers read, never more than the total) and ``bytes_total``. The walk
runs ahead of the reads and stats every file it lists, so the total is the size of the files
walked; while the walk is still going it is at least the previous point's size (the estimate
of the usual incremental), so it only grows, and once the walk ends it is exact.
"""

from __future__ import annotations

from multiprocessing.context import BaseContext
from typing import Any

#: Bytes a worker reads between two updates of the shared counter.
STEP_BYTES = 16 * 1024 * 1024
#: Seconds between two progress reports while a batch is being read.
REPORT_SECONDS = 0.5


class ReadMeter:
    """Bytes read by all workers of one backup: a shared counter, added to in steps.

    Made in the main process and handed to each worker at its start; a worker calls
    :meth:`advance` as it reads and :meth:`flush` when a batch ends."""

    def __init__(self, ctx: BaseContext) -> None:
        self._value: Any = ctx.Value("q", 0)
        self._pending = 0

    def advance(self, n: int) -> None:
        self._pending += n
        if self._pending >= STEP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self._value.get_lock():
                self._value.value += self._pending
            self._pending = 0

    @property
    def read(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> dict[str, Any]:
        return {"_value": self._value, "_pending": 0}


class ProgressTotals:
    """The numbers a backup reports (see the module)."""

    def __init__(self, estimate: int) -> None:
        self.estimate = estimate
        self.walked = 0
        self.reused = 0
        self.walk_done = False

    def total(self) -> int:
        return self.walked if self.walk_done else max(self.estimate, self.walked)

    def done(self, read: int) -> int:
        total = self.total()
        done = self.reused + read
        return min(done, total) if total else done
