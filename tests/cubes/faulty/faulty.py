"""Test entry point: `fail` writes a log and exits with settings.exit_code; `slow` prints
numbered lines at an interval, then writes its result."""

import argparse
import os
import sys
import time


def settings(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if ":" in line:
                key, value = line.split(":", 1)
                values[key.strip()] = value.strip()
    return values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("task")
    parser.add_argument("--settings")
    parser.add_argument("--log_dir")
    parser.add_argument("--result")
    args = parser.parse_args()
    conf = settings(args.settings)
    with open(os.path.join(args.log_dir, args.task + ".log"), "w") as log:
        log.write("started %s\n" % args.task)
    if args.task == "fail":
        print("about to fail", flush=True)
        sys.exit(int(conf.get("exit_code", 7)))
    for i in range(int(conf["lines"])):
        print("line %d" % i, flush=True)
        time.sleep(float(conf["interval"]))
    with open(args.result, "w") as out:
        out.write("done %s lines\n" % conf["lines"])


if __name__ == "__main__":
    main()
