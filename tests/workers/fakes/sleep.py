"""A fake runner that reports progress once and then never returns (a hung model)."""

import json
import time

print(json.dumps({"event": "progress", "fraction": 0.1, "message": "sleeping"}), flush=True)
while True:
    time.sleep(60)
