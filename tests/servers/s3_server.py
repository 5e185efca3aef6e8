"""A real S3 server on 127.0.0.1 for the tiering tests: moto's, in a process of its own.

usage: s3_server.py PORT RESTORE_SECONDS

Archive-class objects (GLACIER, DEEP_ARCHIVE) refuse reads until restored, and a restore takes
RESTORE_SECONDS counted from the RestoreObject request (moto counts from the object's PUT unless
its key-restore state is restarted when the restore is asked: TESTBED.md, "S3").
"""

from __future__ import annotations

import datetime
import sys
import threading

from moto.moto_api import state_manager
from moto.s3.models import FakeKey
from moto.server import ThreadedMotoServer


def main() -> None:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    state_manager.set_transition("s3::keyrestore", {"progression": "time", "seconds": seconds})
    original = FakeKey.restore

    def restore(self: FakeKey, days: int) -> None:
        first = self._expiry is None
        original(self, days)
        if first:  # the thaw starts now, not at the object's PUT
            self._status = "IN_PROGRESS"
            self._time_progressed = datetime.datetime.now()

    FakeKey.restore = restore  # type: ignore[method-assign]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print(f"s3 on 127.0.0.1:{port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
