#!/usr/bin/env python3
"""Listing benchmark: huge directories through a bucketfs mount (issue 13).

Run it through bench/listing.sh, which builds bucketfs and installs fuse3. For each size it
creates a directory of that many empty files on the local disk, then for each of `ls -f | wc -l`
(readdir only) and `ls -l` (readdir, then a stat of every entry) it mounts that directory
through bucketfs (`file://` store, read-only) afresh, drops the page cache, runs the command
and stops the mount. It reports the seconds, the time per entry and the daemon's peak RSS
(VmHWM) and CPU seconds (also per entry: less noisy than wall time on a shared machine), checks that every entry was listed, and deletes the directory.
Results: a table on stdout and --out-dir/listing.json.
"""

import argparse
import json
import os
import platform
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMANDS = {
    # Output piped to wc -l in the shell, like a user would; ls -f lists "." and ".." too.
    "ls -f | wc -l": "ls -f {dir} | wc -l",
    "ls -l": "ls -l {dir} | wc -l",
}


def log(msg):
    print(f"[listing] {msg}", file=sys.stderr, flush=True)


def parse_count(s):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad count {s!r} (e.g. 10k, 1M)")
    return int(m.group(1)) * {"": 1, "k": 1000, "m": 1000000}[m.group(2).lower()]


def human_count(n):
    if n >= 1000000 and n % 1000000 == 0:
        return f"{n // 1000000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def make_entries(path, n):
    """n empty files named f-0000000 ... in path (a few microseconds each, no subprocess)."""
    os.makedirs(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(n):
        os.close(os.open(os.path.join(path, f"f-{i:07d}"), flags, 0o644))


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def proc_stat(pid):
    """(peak RSS KiB, CPU seconds) of pid."""
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


def mounted(mnt):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == mnt for line in f)


class Mount:
    def __init__(self, a, source, mnt, logfile):
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen(
            [os.path.join(a.bin_dir, "bucketfs"), "mount", f"file://{source}", mnt,
             "--foreground", "--read-only", *a.bucketfs_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + a.mount_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bucketfs exited with {self.proc.returncode} before "
                                   f"mounting; see {logfile}")
            if mounted(mnt):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"bucketfs did not mount within {a.mount_timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        self.log.close()


def measure(a, work, source, n, name):
    mnt = os.path.join(work, "mnt")
    m = Mount(a, source, mnt, os.path.join(work, "daemon.log"))
    rec = {"entries": n, "command": name, "ok": False}
    try:
        if not drop_caches():
            rec["note"] = "page cache not dropped (not root?)"
        _, cpu0 = proc_stat(m.proc.pid)
        rec["loadavg_1m"] = os.getloadavg()[0]
        cmd = COMMANDS[name].format(dir=os.path.join(mnt, "d"))
        t0 = time.perf_counter()
        p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True,
                           timeout=a.timeout)
        seconds = time.perf_counter() - t0
        rss, cpu1 = proc_stat(m.proc.pid)
        rec.update({"seconds": seconds, "per_entry_us": seconds / n * 1e6,
                    "peak_rss_kib": rss, "daemon_cpu_s": round(cpu1 - cpu0, 3),
                    "cpu_per_entry_us": (cpu1 - cpu0) / n * 1e6})
        lines = int(p.stdout.strip() or 0) if p.returncode == 0 else None
        # ls -f: every entry plus "." and ".."; ls -l: every entry plus the "total" line.
        want = (n, n + 2) if name.startswith("ls -f") else (n + 1,)
        if lines not in want:
            rec["error"] = (f"{cmd.replace(work, '<work>')} printed {lines} lines, expected "
                            f"{' or '.join(map(str, want))}: {p.stderr.strip()[-300:]}")
        else:
            rec["ok"] = True
    except subprocess.TimeoutExpired:
        rec["error"] = f"timed out after {a.timeout} s"
    finally:
        m.stop()
    return rec


def table(recs, markdown):
    head = ["entries", "command", "seconds", "µs per entry", "daemon peak RSS MiB",
            "daemon CPU s", "CPU µs per entry", "ok"]
    rows = [[human_count(r["entries"]), r["command"],
             f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-",
             f"{r['per_entry_us']:.1f}" if r.get("per_entry_us") is not None else "-",
             f"{r['peak_rss_kib'] / 1024:.0f}" if r.get("peak_rss_kib") else "-",
             f"{r['daemon_cpu_s']:.2f}" if r.get("daemon_cpu_s") is not None else "-",
             f"{r['cpu_per_entry_us']:.1f}" if r.get("cpu_per_entry_us") is not None else "-",
             "yes" if r["ok"] else "FAILED"] for r in recs]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head] + rows]
    out += [f"- {human_count(r['entries'])} {r['command']}: {r['error']}" for r in recs
            if r.get("error")]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10k,100k,1M",
                    help="comma-separated directory sizes (default 10k,100k,1M)")
    ap.add_argument("--commands", default=",".join(COMMANDS),
                    help=f"comma-separated, from: {', '.join(COMMANDS)} (default both)")
    ap.add_argument("--bucketfs-args", type=shlex.split, default=[],
                    help='extra arguments for "bucketfs mount"')
    ap.add_argument("--timeout", type=int, default=3600,
                    help="seconds before a listing counts as failed (default 3600)")
    ap.add_argument("--mount-timeout", type=int, default=60)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"),
                    help="where listing.json goes (default bench/results)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=os.environ.get("BUCKETFS_BENCH_TMP",
                                                    tempfile.gettempdir()),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [parse_count(s) for s in a.sizes.split(",") if s.strip()]
    commands = [c.strip() for c in a.commands.split(",") if c.strip()]
    bad = [c for c in commands if c not in COMMANDS]
    if bad or not sizes:
        ap.error(f"unknown command {bad}" if bad else "no sizes")

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_all = time.perf_counter()
    recs = []
    work = tempfile.mkdtemp(prefix="bucketfs-listing.", dir=a.tmp)
    try:
        for n in sizes:
            source = os.path.join(work, "root")
            t0 = time.perf_counter()
            make_entries(os.path.join(source, "d"), n)
            made = time.perf_counter() - t0
            log(f"created {n} empty files in {made:.1f} s")
            for name in commands:
                rec = measure(a, work, source, n, name)
                rec["create_seconds"] = round(made, 1)
                recs.append(rec)
                if rec["ok"]:
                    log(f"{human_count(n)} {name}: {rec['seconds']:.2f} s, "
                        f"{rec['per_entry_us']:.1f} µs/entry, "
                        f"{rec['cpu_per_entry_us']:.1f} µs/entry of daemon CPU, peak RSS "
                        f"{rec['peak_rss_kib'] / 1024:.0f} MiB")
                else:
                    log(f"{human_count(n)} {name}: FAILED: {rec.get('error')}")
            t0 = time.perf_counter()
            shutil.rmtree(source)
            log(f"deleted them in {time.perf_counter() - t0:.1f} s")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'})")
        sys.exit(130)
    finally:
        mnt = os.path.join(work, "mnt")
        if mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    data = {
        "params": {"sizes": sizes, "commands": commands, "bucketfs_args": a.bucketfs_args,
                   "command": os.environ.get("BUCKETFS_BENCH_COMMAND")},
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release()},
        "bucketfs_git": subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                       capture_output=True, text=True).stdout.strip() or None,
        "started": started,
        "duration_s": round(time.perf_counter() - t_all, 1),
        "runs": recs,
    }
    os.makedirs(a.out_dir, exist_ok=True)
    out = os.path.join(a.out_dir, "listing.json")
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(table(recs, a.markdown))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
