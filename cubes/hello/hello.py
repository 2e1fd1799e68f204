"""The hello cube: `python3 hello.py greet --names=FILE --greetings_dir=DIR` writes one
greeting file per name; `summarize --greetings_dir=DIR --summary=FILE` writes a summary.
Standard library only, so it runs on any Python 3."""

import argparse
import sys
from pathlib import Path


def read_names(path: Path) -> list[str]:
    # names.yaml is a plain YAML list ("- Ada"); parsed by hand to stay dependency-free.
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("- ") and line[2:].strip():
            names.append(line[2:].strip().strip("'\""))
    return names


def greet(names: Path, greetings_dir: Path) -> None:
    greetings_dir.mkdir(parents=True, exist_ok=True)
    for name in read_names(names):
        text = f"Hello, {name}!"
        (greetings_dir / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        print(text, flush=True)


def summarize(greetings_dir: Path, summary: Path) -> None:
    files = sorted(greetings_dir.glob("*.txt"))
    line = f"{len(files)} greetings: {', '.join(f.stem for f in files)}"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hello.py")
    sub = parser.add_subparsers(dest="task", required=True)
    g = sub.add_parser("greet")
    g.add_argument("--names", type=Path, required=True)
    g.add_argument("--greetings_dir", type=Path, required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--greetings_dir", type=Path, required=True)
    s.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.task == "greet":
        greet(args.names, args.greetings_dir)
    else:
        summarize(args.greetings_dir, args.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
