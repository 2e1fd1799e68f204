"""`python3 ranker.py rank --plan=FILE --report=FILE`: one rank of a multi-node run.

Rank 0 listens on CUBE_MASTER_PORT and waits for a hello from every other rank, which connects
to CUBE_MASTER_ADDR:CUBE_MASTER_PORT (so the hosts' network is checked), then every rank
writes its environment and what it heard to the report and naps `seconds=S` from the plan,
printing a tick each second (a test kills one rank meanwhile).
"""

import json
import os
import socket
import sys
import time

NAMES = ("CUBE_RANK", "CUBE_WORLD_SIZE", "CUBE_MASTER_ADDR", "CUBE_MASTER_PORT", "RANK",
         "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TF_CONFIG", "CUBE_SLOTS")


def serve(port, others):
    heard = []
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", port))
        server.listen(others)
        server.settimeout(120)
        while len(heard) < others:
            conn, _ = server.accept()
            with conn:
                heard.append(conn.makefile().readline().strip())
    return heard


def hello(address, port, rank):
    deadline = time.time() + 120
    while True:
        try:
            with socket.create_connection((address, port), timeout=5) as conn:
                conn.sendall(("hello from rank %d\n" % rank).encode())
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    with open(args["plan"]) as f:
        plan = dict(line.strip().split("=", 1) for line in f if "=" in line)
    rank, world = int(os.environ["CUBE_RANK"]), int(os.environ["CUBE_WORLD_SIZE"])
    print("rank %d of %d on %s" % (rank, world, socket.gethostname()), flush=True)
    port = int(os.environ["CUBE_MASTER_PORT"])
    heard = serve(port, world - 1) if rank == 0 else []
    if rank != 0:
        hello(os.environ["CUBE_MASTER_ADDR"], port, rank)
    for line in heard:
        print("heard: %s" % line, flush=True)
    with open(args["report"], "w") as f:
        json.dump({"env": {n: os.environ.get(n) for n in NAMES}, "heard": heard}, f)
    for tick in range(int(float(plan.get("seconds", 0)))):
        print("tick %d" % tick, flush=True)
        time.sleep(1)
    print("rank %d done" % rank, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
