#!/usr/bin/env python3
"""fsync_latency: what one durable commit costs on the disk under DIR (docs/KMS.md, "Commit
path"). Three loops of N writes each, latency per call:
  - fsync after appending 4 KiB (the file grows: the filesystem journals metadata too);
  - fdatasync after overwriting 4 KiB in place;
  - a one-row SQLite transaction, WAL mode, synchronous=FULL, normal locking (as the KME's
    durable store since session 5; exclusive locking before); reported for the first 1000
    commits (the WAL grows) and after. SQLite's automatic checkpoint (1000 pages) runs in
    the commit here, unlike in the store.

Then, for the ways a KME could make a request durable faster than "wait for the sync in
progress, then for one's own" (session 12):
  - O_DIRECT | O_DSYNC: each 4 KiB overwrite is durable when write() returns;
  - the open loop: a 4 KiB overwrite every 1/RATE s, latency from its scheduled time until a
    fdatasync that began after it returned; one syncer (group commit, as the store) against
    two, where a write arriving during a sync starts another at once.

  python3 bench/fsync_latency.py [--dir DIR] [--n N] [--rate R]
"""
import argparse
import mmap
import os
import sqlite3
import tempfile
import threading
import time


def pct(values, p):
    v = sorted(values)
    return v[int(p * (len(v) - 1))]


def report(name, lat):
    if not lat:
        return
    print(f"| {name} | {len(lat)} | {pct(lat, .5):.0f} | {pct(lat, .9):.0f} | "
          f"{pct(lat, .99):.0f} | {max(lat):.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: $TMPDIR)")
    ap.add_argument("--n", type=int, default=3000, help="writes per loop (default 3000)")
    ap.add_argument("--rate", type=float, default=1000,
                    help="the open loop's writes per second (default 1000)")
    a = ap.parse_args()
    buf = os.urandom(4096)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        print("| operation | n | p50 µs | p90 µs | p99 µs | max µs |\n|---|---|---|---|---|---|")
        path = os.path.join(d, "f.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        lat = []
        for _ in range(a.n):
            os.write(fd, buf)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append((time.perf_counter() - t) * 1e6)
        report("fsync after a 4 KiB append", lat)
        lat = []
        for _ in range(a.n):
            os.pwrite(fd, buf, 0)
            t = time.perf_counter()
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t) * 1e6)
        os.close(fd)
        report("fdatasync after a 4 KiB overwrite", lat)
        db = sqlite3.connect(os.path.join(d, "t.db"), isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=FULL"):
            db.execute("PRAGMA " + pragma)
        db.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        lat = []
        for i in range(a.n):
            t = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES(?, ?)", (i, buf[:200]))
            db.execute("COMMIT")
            lat.append((time.perf_counter() - t) * 1e6)
        db.close()
        report("SQLite 1-row commit (WAL, FULL), first 1000", lat[:1000])
        report("SQLite 1-row commit (WAL, FULL), after", lat[1000:])
        more_ways(d, a.n, a.rate)


def direct_dsync(path, n):
    """4 KiB overwrites through O_DIRECT | O_DSYNC (an aligned buffer); None if refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    except OSError:
        return None
    page = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    page.write(os.urandom(4096))
    lat = []
    try:
        for i in range(n):
            t = time.perf_counter()
            os.pwritev(fd, [page], (i % 1024) * 4096)
            lat.append((time.perf_counter() - t) * 1e6)
    except OSError:
        return None
    finally:
        os.close(fd)
    return lat


def open_loop(path, n, rate, syncers):
    """n overwrites of 4 KiB at `rate` per second; each is durable once a fdatasync that
    began after it has returned. `syncers` threads sync: with two, a write that arrives
    while one syncs starts the other at once."""
    buf = os.urandom(4096)
    fd = os.open(path, os.O_RDWR)
    mu = threading.Condition()
    state = {"written": 0, "claimed": 0, "durable": 0, "done": False}
    start = time.perf_counter() + 0.05
    due = [start + i / rate for i in range(n)]
    lat = [0.0] * n

    def syncer():
        with mu:
            while True:
                mu.wait_for(lambda: state["done"] or state["written"] > state["claimed"])
                if state["written"] <= state["claimed"]:
                    return
                upto = state["claimed"] = state["written"]
                mu.release()
                try:
                    os.fdatasync(fd)
                finally:
                    mu.acquire()
                now = time.perf_counter()
                for i in range(state["durable"], upto):
                    lat[i] = (now - due[i]) * 1e6
                state["durable"] = max(state["durable"], upto)

    threads = [threading.Thread(target=syncer) for _ in range(syncers)]
    for t in threads:
        t.start()
    for i in range(n):
        delay = due[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        os.pwrite(fd, buf, (i % 1024) * 4096)
        with mu:
            state["written"] = i + 1
            mu.notify()
    with mu:
        state["done"] = True
        mu.notify_all()
    for t in threads:
        t.join()
    os.close(fd)
    return lat


def more_ways(d, n, rate):
    path = os.path.join(d, "g.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(4096 * 1024))
        f.flush()
        os.fsync(f.fileno())
    lat = direct_dsync(path, n)
    if lat is None:
        print("| O_DIRECT + O_DSYNC 4 KiB overwrite | refused by this filesystem | | | | |")
    else:
        report("O_DIRECT + O_DSYNC 4 KiB overwrite", lat)
    for syncers in (1, 2, 1, 2):
        report(f"open loop {rate:.0f}/s, {syncers} syncer{'s' if syncers > 1 else ''}",
               open_loop(path, n, rate, syncers))


if __name__ == "__main__":
    main()
