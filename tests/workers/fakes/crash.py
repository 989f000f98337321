"""A fake runner that dies without a word, as if the OOM killer took it."""

import os
import signal

os.kill(os.getpid(), signal.SIGKILL)
