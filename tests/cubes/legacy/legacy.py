"""MLCube-style entry point: `python3 legacy.py TASK --param=PATH ...` (stdlib only)."""

import argparse
import re
import sys
from pathlib import Path


def read_value(path: Path, key: str) -> str:
    # The configs are one-line YAML values ("key: value"), read without a YAML library.
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"\s*{key}\s*:\s*(.+?)\s*$", line)
        if m:
            return m.group(1)
    raise SystemExit(f"{path}: no '{key}:' line")


def log(log_dir: Path, task: str, text: str) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{task}.log", "a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text, flush=True)


def download(data_config: Path, data_dir: Path, log_dir: Path) -> None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", read_value(data_config, "numbers"))
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "numbers.txt").write_text("\n".join(numbers) + "\n", encoding="utf-8")
    log(log_dir, "download", f"downloaded {len(numbers)} numbers")


def train(data_dir: Path, train_config: Path, log_dir: Path, model_dir: Path) -> None:
    numbers = [float(x) for x in (data_dir / "numbers.txt").read_text().split()]
    mean = round(sum(numbers) / len(numbers), int(read_value(train_config, "digits")))
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.txt").write_text(f"{mean}\n", encoding="utf-8")
    log(log_dir, "train", f"trained on {len(numbers)} numbers: mean={mean}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="legacy.py")
    sub = parser.add_subparsers(dest="task", required=True)
    d = sub.add_parser("download")
    for name in ("data_config", "data_dir", "log_dir"):
        d.add_argument(f"--{name}", type=Path, required=True)
    t = sub.add_parser("train")
    for name in ("data_dir", "train_config", "log_dir", "model_dir"):
        t.add_argument(f"--{name}", type=Path, required=True)
    args = vars(parser.parse_args(argv))
    {"download": download, "train": train}[args.pop("task")](**args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
