#!/usr/bin/env python3
"""fsync_latency: what one durable commit costs on the disk under DIR (docs/KMS.md, "Commit
path"). Three loops of N writes each, latency per call:
  - fsync after appending 4 KiB (the file grows: the filesystem journals metadata too);
  - fdatasync after overwriting 4 KiB in place;
  - a one-row SQLite transaction, WAL mode, synchronous=FULL, normal locking (as the KME's
    durable store since session 5; exclusive locking before); reported for the first 1000
    commits (the WAL grows) and after. SQLite's automatic checkpoint (1000 pages) runs in
    the commit here, unlike in the store.

  python3 bench/fsync_latency.py [--dir DIR] [--n N]
"""
import argparse
import os
import sqlite3
import tempfile
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


if __name__ == "__main__":
    main()
