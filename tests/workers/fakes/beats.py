"""A fake runner that works for 3 s, beating every 0.2 s as the real runner does while its model
returns, and then reports that its shards are done."""

import json
import time

for _ in range(15):
    time.sleep(0.2)
    info = {"model_calls": 1, "largest_batch": 8}
    print(json.dumps({"event": "beat", "info": info}), flush=True)
print(json.dumps({"event": "done"}), flush=True)
