"""hello-docker: `hello.py TASK --param=PATH ...` (MLCube's calling convention), stdlib only."""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def greet(args) -> None:
    names = [n.strip() for n in Path(args.names).read_text().splitlines() if n.strip()]
    if not names:
        print(f"no names in {args.names}", file=sys.stderr)
        sys.exit(3)
    out = Path(args.out_dir)
    for name in names:
        (out / f"{name}.txt").write_text(f"{os.environ.get('GREETING', 'Hi')}, {name}!\n")
    probe = Path(args.names).parent / ".write-probe"
    try:
        probe.write_text("x")
        probe.unlink()
        input_writable = True
    except OSError:
        input_writable = False
    meta = {"uid": os.getuid(), "gid": os.getgid(), "input_writable": input_writable,
            "names": len(names), "home": os.environ.get("HOME")}
    (out / "_run.json").write_text(json.dumps(meta))
    print(f"greeted {len(names)} names")


def count(args) -> None:
    files = [p for p in Path(args.greetings).glob("*.txt")]
    Path(args.report).write_text(f"{len(files)} greetings\n")
    print(f"counted {len(files)} greetings")


def idle(args) -> None:
    Path(args.marker).write_text(str(os.getpid()))
    print("idling", flush=True)
    while True:
        time.sleep(1)


def main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=["greet", "count", "idle"])
    for name in ("names", "out_dir", "greetings", "report", "marker"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    {"greet": greet, "count": count, "idle": idle}[args.task](args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
