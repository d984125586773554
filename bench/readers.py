#!/usr/bin/env python3
"""The measured clients of the benchmark, each run as its own process by bench.py.

Every command times only the work itself (imports and start-up excluded), checks what it read
against the local copy of the data *after* the clock stops, and prints one JSON line:

    random PATH --local FILE --size N --count K --seed S   K preads of N bytes at random offsets
    safetensors PATH --local FILE                          safetensors.numpy.load_file(PATH)
    list DIR --expect N                                    scandir + stat of every entry
    small DIR --count N --size B --threads T               cat of DIR/file-00000.txt ... in order
    small-direct BUCKET --endpoint-url URL --prefix P --count N --size B --threads T
                                                           the same objects as direct GETs (boto3)

The sequential read is `dd` (run by bench.py itself).
"""

import argparse
import json
import os
import random
import sys
import time


def machine_cpu():
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat: busy is every
    process and the kernel (user, nice, system, irq, softirq); stolen is what the hypervisor
    gave other machines. bench.py reads it around `dd` and the direct download; the readers
    here around their timed part, so their checks after it do not count."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def timed_cpu(cpu0, seconds):
    """The fields bench.py reads for the machine's CPU over a timed part that started at
    `cpu0 = machine_cpu()` and took `seconds`."""
    busy, stolen = (b - a for a, b in zip(cpu0, machine_cpu()))
    return {"machine_cpu_s": busy, "machine_steal_s": stolen, "machine_wall_s": seconds}


def random_offsets(size, read_size, count, seed):
    """The offsets of the random-read test (page-aligned, each read inside the file); the
    direct baseline of random reads (bench.py) GETs the same ranges."""
    rng = random.Random(seed)
    span = max(size - read_size, 0)
    return [rng.randrange(0, span // 4096 + 1) * 4096 for _ in range(count)]


def cmd_random(a):
    offsets = random_offsets(os.stat(a.local).st_size, a.size, a.count, a.seed)
    blocks = []
    cpu0 = machine_cpu()
    t0 = time.perf_counter()
    fd = os.open(a.path, os.O_RDONLY)
    try:
        for off in offsets:
            blocks.append(os.pread(fd, a.size, off))
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    cpu = timed_cpu(cpu0, seconds)
    total = sum(len(b) for b in blocks)
    with open(a.local, "rb") as f:
        for off, got in zip(offsets, blocks):
            want = os.pread(f.fileno(), a.size, off)
            if got != want:
                sys.exit(f"random read at {off}: {len(got)} bytes differ from the uploaded data")
    print(json.dumps({"bytes": total, "seconds": seconds, "reads": a.count,
                      "read_size": a.size, "verified": True, **cpu}))


def cmd_safetensors(a):
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file

    cpu0 = machine_cpu()
    t0 = time.perf_counter()
    tensors = load_file(a.path, backend=a.backend)
    seconds = time.perf_counter() - t0
    cpu = timed_cpu(cpu0, seconds)
    loaded = sum(t.nbytes for t in tensors.values())
    with safe_open(a.local, framework="np") as f:
        names = set(f.keys())
        if names != set(tensors):
            sys.exit(f"loaded {len(tensors)} tensors, the file has {len(names)}")
        for name in names:
            want = f.get_tensor(name)
            got = tensors[name]
            if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(
                    got.view(np.uint8), want.view(np.uint8)):
                sys.exit(f"tensor {name} differs from the uploaded data")
    print(json.dumps({"bytes": os.stat(a.local).st_size, "tensor_bytes": loaded,
                      "tensors": len(tensors), "seconds": seconds, "backend": a.backend,
                      "verified": True, **cpu}))


def cmd_list(a):
    t0 = time.perf_counter()
    n = 0
    total = 0
    with os.scandir(a.path) as it:
        for entry in it:
            st = os.stat(entry.path)
            n += 1
            total += st.st_size
    seconds = time.perf_counter() - t0
    if a.expect is not None and n != a.expect:
        sys.exit(f"listed {n} entries, expected {a.expect}")
    print(json.dumps({"files": n, "bytes": total, "seconds": seconds, "verified": True}))


def small_names(count):
    return [f"file-{i:05d}.txt" for i in range(count)]


def small_body(i, size):
    """What bench.py uploaded as small file i."""
    return (f"file {i:05d}\n".encode() * (size // 11 + 1))[:size]


def read_in_order(fetch, count, threads):
    """fetch(i) for i in 0..count, one after another or with `threads` workers taking the files
    in order (as `xargs -P` would); returns (bodies, seconds)."""
    t0 = time.perf_counter()
    if threads <= 1:
        bodies = [fetch(i) for i in range(count)]
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            bodies = list(pool.map(fetch, range(count)))
    return bodies, time.perf_counter() - t0


def check_small(bodies, size):
    for i, got in enumerate(bodies):
        if got != small_body(i, size):
            sys.exit(f"small file {i}: {len(got)} bytes differ from the uploaded data")


def cmd_small(a):
    names = small_names(a.count)

    def fetch(i):
        # open, read to the end, close: what cat does.
        with open(os.path.join(a.path, names[i]), "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(1 << 17):
                chunks.append(chunk)
        return b"".join(chunks)

    bodies, seconds = read_in_order(fetch, a.count, a.threads)
    check_small(bodies, a.size)
    print(json.dumps({"files": a.count, "bytes": sum(map(len, bodies)), "seconds": seconds,
                      "threads": a.threads, "verified": True}))


def cmd_small_direct(a):
    import resource
    import boto3
    from botocore.config import Config
    s3 = boto3.client("s3", endpoint_url=a.endpoint_url,
                      region_name=os.environ.get("AWS_REGION", "us-east-1"),
                      config=Config(s3={"addressing_style": "path"},
                                    max_pool_connections=max(a.threads, 10)))
    names = small_names(a.count)

    def fetch(i):
        return s3.get_object(Bucket=a.bucket, Key=a.prefix + names[i])["Body"].read()

    bodies, seconds = read_in_order(fetch, a.count, a.threads)
    check_small(bodies, a.size)
    print(json.dumps({"files": a.count, "bytes": sum(map(len, bodies)), "seconds": seconds,
                      "threads": a.threads,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "verified": True}))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("random")
    r.add_argument("path")
    r.add_argument("--local", required=True)
    r.add_argument("--size", type=int, default=4 << 20)
    r.add_argument("--count", type=int, default=64)
    r.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("safetensors")
    s.add_argument("path")
    s.add_argument("--local", required=True)
    s.add_argument("--backend", default="mmap", choices=["mmap", "pread"])
    li = sub.add_parser("list")
    li.add_argument("path")
    li.add_argument("--expect", type=int)
    for name in ("small", "small-direct"):
        sm = sub.add_parser(name)
        sm.add_argument("bucket" if name == "small-direct" else "path")
        if name == "small-direct":
            sm.add_argument("--endpoint-url", required=True)
            sm.add_argument("--prefix", default="")
        sm.add_argument("--count", type=int, required=True)
        sm.add_argument("--size", type=int, required=True)
        sm.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    {"random": cmd_random, "safetensors": cmd_safetensors, "list": cmd_list, "small": cmd_small,
     "small-direct": cmd_small_direct}[a.cmd](a)


if __name__ == "__main__":
    main()
