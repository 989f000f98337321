"""A fake runner that allocates memory without end; under RLIMIT_AS it gets a MemoryError,
which the real runner's error handling reports
(used through workers.sandbox.runner.describe_failure)."""

import sys

from workers.sandbox.runner import describe_failure, take_over_stdout

events = take_over_stdout()
try:
    hoard = []
    while True:
        hoard.append(bytearray(64 * 1024 * 1024))
except MemoryError as exc:
    del hoard
    events.emit("error", **describe_failure(exc))
    sys.exit(1)
