"""A fake runner whose start takes 3 s before its first line (imports on a busy machine), then
finishes its job."""

import json
import time

time.sleep(3.0)
print(json.dumps({"event": "progress", "fraction": 0.5, "message": "started"}), flush=True)
print(json.dumps({"event": "done", "info": {"shards": []}}), flush=True)
