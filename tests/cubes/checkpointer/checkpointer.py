"""`python3 checkpointer.py count --checkpoint=FILE --result=FILE`: CHECKPOINTER_STEPS (8)
one-second steps; the step is saved after each, and a rerun starts after the saved one.
SIGUSR1 (Slurm's warning before a time limit or preemption) saves at once."""

import os
import signal
import sys
import time


def save(path, step):
    with open(path + ".tmp", "w") as f:
        f.write(f"{step}\n")
    os.replace(path + ".tmp", path)  # a kill mid-write leaves the old checkpoint


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    checkpoint, result = opts["checkpoint"], opts["result"]
    steps = int(os.environ.get("CHECKPOINTER_STEPS", 8))
    start = 0
    if os.path.exists(checkpoint):
        start = int(open(checkpoint).read().strip() or 0)
        print(f"resumed from step {start}", flush=True)
    step = start
    signal.signal(signal.SIGUSR1, lambda *_: (save(checkpoint, step),
                                              print(f"USR1: saved step {step}", flush=True)))
    while step < steps:
        time.sleep(1)
        step += 1
        save(checkpoint, step)
        print(f"step {step}", flush=True)
    with open(result, "w") as f:
        f.write(f"steps={steps} resumed_from={start}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
