"""`python3 tuner.py tune --config=FILE --notes=FILE --result=DIR`: wait, then score the config.

metrics.json gets score = rate * steps * depth (so each varied value shows in it) and loss =
1 / score; the task fails with exit 3 while the config's `must_exist` path is missing."""

import json
import os
import sys
import time

import yaml


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--"))
    with open(args["config"]) as f:
        cfg = yaml.safe_load(f)
    print(f"tuning with {cfg}", flush=True)
    if not os.path.exists(cfg["must_exist"]):
        print(f"{cfg['must_exist']} does not exist", flush=True)
        return 3
    time.sleep(float(cfg["seconds"]))
    score = cfg["rate"] * cfg["steps"] * cfg["model"]["depth"]
    os.makedirs(args["result"], exist_ok=True)
    with open(os.path.join(args["result"], "metrics.json"), "w") as f:
        json.dump({"score": score, "loss": 1.0 / score, "optimizer": cfg["optimizer"],
                   "types": [type(cfg[k]).__name__ for k in ("rate", "steps", "verbose")]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
