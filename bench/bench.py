#!/usr/bin/env python3
"""Model-loading benchmark: bucketfs next to a direct-download baseline and peers (s3fs, rclone).

Run it through bench/run.sh, which installs what is needed, builds bucketfs and the helper
examples, starts the local S3 server (SeaweedFS) and always cleans up. This script expects:

- the S3 server at $BUCKETFS_TEST_S3_ENDPOINT with $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY;
- --bin-dir holding bucketfs and examples/delay_proxy, examples/direct_download;
- --workdir, a scratch directory it may fill (model copy, mount points, peer caches).

For every latency setting it puts the delay proxy in front of the server (unless the latency is
0 and --proxy-always is off), then measures each scenario --runs times, cold: every measurement
drops the page cache and gets a fresh mount. Results: a table on stdout, raw runs and summary in
--out-dir/latest.json, a chart in --out-dir/latest.png.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import report  # noqa: E402

BUCKET = "bucketfs-bench"
MODEL_KEY = "model/model.safetensors"
SMALL_PREFIX = "small/"
PEERS = ["s3fs", "s3fs+cache", "rclone", "rclone+cache"]
MOUNTS = ["bucketfs"] + PEERS
TESTS = ["seq", "random", "safetensors", "list"]


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
    def __init__(self, ctx, kind, endpoint, index):
        self.ctx, self.kind, self.proc = ctx, kind, None
        a = ctx.args
        base = os.path.join(ctx.workdir, f"m{index}-{kind.replace('+', '-')}")
        self.mnt = os.path.join(base, "mnt")
        self.cache = os.path.join(base, "cache")
        self.logfile = os.path.join(base, "daemon.log")
        os.makedirs(self.mnt)
        os.makedirs(self.cache)
        env = dict(os.environ)
        region = os.environ.get("AWS_REGION", "us-east-1")
        if kind == "bucketfs":
            self.argv = [os.path.join(a.bin_dir, "bucketfs"), "mount", f"s3://{BUCKET}", self.mnt,
                         "--read-only", "--endpoint-url", endpoint, "--force-path-style",
                         *a.bucketfs_args]
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
            self.argv = ["rclone", "mount", f"bench:{BUCKET}", self.mnt, "--read-only",
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
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise Failed(f"{self.kind} did not mount within {self.ctx.args.mount_timeout} s: "
                     + self.ctx.scrub(tail(self.logfile, 5)))

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

    def stop(self):
        if self.proc is None:
            return
        p = self.proc
        if p.poll() is None:
            if self.kind == "bucketfs":
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


def delete_bucket():
    s3 = s3_client()
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
    s3.delete_bucket(Bucket=BUCKET)


# --- measurements ------------------------------------------------------------------------------

def drop_caches(ctx):
    """Empties the page cache, then reads the S3 server's own files back in: every measurement
    starts cold on the client side while the server answers from memory, as a real store would
    rather than at the speed of this machine's disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        ctx.warn(f"cannot drop the page cache ({e}); reads may not be cold")
        return
    if ctx.args.no_warm_server:
        return
    servers = os.environ.get("BUCKETFS_SERVERS_DIR")
    if not servers:
        return
    buf = bytearray(8 << 20)
    for root, _, files in os.walk(os.path.join(servers, "weed")):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            except OSError:
                pass


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
    else:
        argv = [py, readers, "list", os.path.join(mount.mnt, SMALL_PREFIX.rstrip("/")),
                "--expect", str(a.small_files)]
    code, out, err, _ = run_child(argv, a.timeout)
    if code != 0:
        raise Failed(f"{test} exited with {code}: {ctx.scrub(err.strip())[-300:]}")
    res = json.loads(out)
    return {k: v for k, v in res.items() if k != "verified"}


def measure(ctx, scenario, latency, run, endpoint, proxy, index):
    metric = "files/s" if scenario.endswith("list") else "MiB/s"
    rec = {"scenario": scenario, "latency_ms": latency, "run": run, "metric": metric,
           "ok": False}
    drop_caches(ctx)
    # Other work on the machine skews every number: keep the load next to each measurement.
    rec["loadavg_1m"] = os.getloadavg()[0]
    before = proxy.stats() if proxy else None
    mount = None
    try:
        if scenario in ("direct", "direct-list"):
            res = direct(ctx, endpoint, scenario == "direct-list")
        else:
            kind, test = scenario.split("/")
            mount = Mount(ctx, kind, endpoint, index)
            mount.start()
            res = on_mount(ctx, mount, test, run)
            res["peak_rss_kib"] = mount.peak_rss_kib()
        if proxy:
            after = proxy.stats()
            res["fetched_bytes"] = after["response_bytes"] - before["response_bytes"]
            res["requests"] = after["requests"] - before["requests"]
            res["connections"] = after["connections"] - before["connections"]
        rec.update(res)
        if metric == "files/s":
            rec["value"] = res["files"] / res["seconds"]
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
        return f"FAILED: {rec['error']}"
    parts = [f"{rec['value']:.1f} {rec['metric']}", f"{rec['seconds']:.2f} s"]
    if rec.get("peak_rss_kib"):
        parts.append(f"peak RSS {rec['peak_rss_kib'] / 1024:.0f} MiB")
    if rec.get("fetched_bytes") is not None and rec.get("bytes"):
        parts.append(f"fetched/read {rec['fetched_bytes'] / rec['bytes']:.2f}, "
                     f"{rec['requests']} requests")
    return ", ".join(parts)


# --- the run -----------------------------------------------------------------------------------

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
        "rclone": first_line(["rclone", "version"]),
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


def scenarios(args):
    byte_tests = {"bucketfs": [t for t in args.bucketfs_tests if t != "list"]}
    list_tests = {"bucketfs": [t for t in args.bucketfs_tests if t == "list"]}
    for peer in PEERS:
        byte_tests[peer] = [t for t in args.peer_tests if t != "list"]
        list_tests[peer] = [t for t in args.peer_tests if t == "list"]
    out = ["direct"]
    out += [f"{m}/{t}" for m in args.mounts for t in byte_tests[m]]
    listed = [f"{m}/{t}" for m in args.mounts for t in list_tests[m]]
    if listed:
        out += ["direct-list"] + listed
    return out


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
    ap.add_argument("--peer-tests", type=name_list(TESTS), default=["seq"],
                    help="tests on the s3fs and rclone mounts (default seq)")
    ap.add_argument("--bucketfs-args", type=shlex.split, default=[],
                    help='extra arguments for "bucketfs mount", e.g. "--read-concurrency 16"')
    ap.add_argument("--timeout", type=int, default=1800,
                    help="seconds before a measurement counts as failed (default 1800)")
    ap.add_argument("--mount-timeout", type=int, default=30,
                    help="seconds a daemon gets to mount (default 30)")
    ap.add_argument("--no-warm-server", action="store_true",
                    help="after dropping the page cache, do not read the server's files back")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"),
                    help="where latest.json and latest.png go (default bench/results)")
    # Set by run.sh.
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--workdir", required=True, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.random_read_size > args.model_size:
        ap.error("--random-read-size is larger than the model")
    for var in ("BUCKETFS_TEST_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            ap.error(f"${var} is not set: run through bench/run.sh")

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    ctx = Context(args)
    ctx.model_path = os.path.join(ctx.workdir, "model.safetensors")
    plan = scenarios(args)
    log(f"plan: latencies {args.latency_ms} ms, {args.runs} run(s) of {', '.join(plan)}")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    tensors = make_model(ctx.model_path, args.model_size)
    ctx.model_bytes = os.stat(ctx.model_path).st_size
    log(f"wrote a safetensors file of {tensors} tensors, {ctx.model_bytes} bytes, "
        f"in {time.perf_counter() - t0:.1f} s")
    upload(ctx, ctx.model_path, args.small_files, args.small_file_size)

    runs = []
    proxy = None
    index = 0
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
            for run in range(1, args.runs + 1):
                for scenario in plan:
                    index += 1
                    rec = measure(ctx, scenario, latency, run, endpoint, proxy, index)
                    rec["connect_delay_ms"] = connect
                    rec["proxy"] = proxy is not None
                    runs.append(rec)
                    log(f"{latency} ms, run {run}/{args.runs}, {scenario}: {show(rec)}")
            if proxy:
                proxy.stop()
                proxy = None
    finally:
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
            "warm_server": not args.no_warm_server,
            "command": os.environ.get("BUCKETFS_BENCH_COMMAND"),
        },
        "machine": machine_info(),
        "versions": versions(args),
        "started": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        "warnings": ctx.warnings,
        "runs": runs,
    }
    data["summary"] = report.summarize(runs)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "latest.json"), "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    report.plot(data, os.path.join(args.out_dir, "latest.png"))
    print()
    print(f"model {human(args.model_size)} ({ctx.model_bytes} bytes, {tensors} tensors), "
          f"{args.runs} run(s), bucketfs args: {shlex.join(args.bucketfs_args) or '(none)'}")
    print(report.table(data["summary"]))
    shown = os.path.relpath(args.out_dir)
    if shown.startswith(".."):
        shown = args.out_dir
    print(f"\nwrote {os.path.join(shown, 'latest.json')} and latest.png")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); mounts, proxy and bucket cleaned up")
        sys.exit(130)
