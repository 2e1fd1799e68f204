"""`python3 sleeper.py wait --ticks=FILE`: a tick a half second, for SLEEPER_SECONDS (600)."""

import os
import sys
import time


def main(argv):
    ticks = next(a.split("=", 1)[1] for a in argv if a.startswith("--ticks="))
    seconds = float(os.environ.get("SLEEPER_SECONDS", 600))
    n = 0
    start = time.time()
    while time.time() - start < seconds:
        n += 1
        print(f"tick {n}", flush=True)
        with open(ticks, "w") as f:
            f.write(f"{n}\n")
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
