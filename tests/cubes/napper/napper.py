"""`python3 napper.py nap --plan=FILE --times=FILE`: wait, then record start and end.

The plan file holds `seconds=S` (sleep S seconds) and optionally `gate=PATH` (first wait until
PATH exists: lab hosts share the test machine's files, so a test decides when jobs end).
"""

import json
import os
import sys
import time


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    with open(args["plan"]) as f:
        plan = dict(line.strip().split("=", 1) for line in f if "=" in line)
    start = time.time()
    print(f"napping from {start}", flush=True)
    while plan.get("gate") and not os.path.exists(plan["gate"]):
        time.sleep(0.1)
    time.sleep(float(plan.get("seconds", 0)))
    with open(args["times"], "w") as f:
        json.dump({"start": start, "end": time.time(), "slots": os.environ.get("CUBE_SLOTS"),
                   "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
