"""The allocator settings of appliance.allocator, measured in a fresh process by page faults."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, resource, sys
if sys.argv[1] == "tuned":
    from appliance.allocator import tune_allocator
    assert tune_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
size = 16 << 20
def round():  # a few packs alive at once, as a copy's read-ahead or an upload's pieces hold them
    held = [b"x" * size for _ in range(3)]
    held.append(held[0] + held[1][: 1 << 20])
    del held
for _ in range(3):  # the first rounds place the buffers; count the rounds after
    round()
before = faults()
for _ in range(10):
    round()
print(json.dumps({"faults": faults() - before}))
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(json.loads(out.stdout)["faults"])


def test_pack_sized_buffers_are_reused_without_page_faults() -> None:
    # 10 rounds of 65 MiB: 16640 pages each when the memory goes back to the kernel every time.
    assert _faults("default") > 10 * 4096
    assert _faults("tuned") < 4096
