#!/usr/bin/env python3
"""Summary table and chart of a benchmark run (bench/results/*.json).

    python3 bench/report.py bench/results/latest.json [--png OUT.png] [--png2 OUT2.png] [--markdown]

reprints the table of a finished run and redraws its chart; bench.py uses the same functions.
"""

import argparse
import json
import statistics

# The tables, in order: (group, title, baseline scenario; None = per mount, see baseline_of).
GROUPS = [
    ("read", "Cold reads of the model (vs direct ranged GETs)", "direct"),
    ("small", "Small files, fresh mount: cat of every file in order (time vs the same GETs done "
              "directly; lower is better)", None),
    ("list", "Listing (vs direct LIST)", "direct-list"),
    ("warm", "Warm reads from a full disk cache (issue 4; vs the local file)", "local-disk"),
    ("replicas", "Replicas sharing one cache dir, cold (issue 4; wall time vs 1 replica)", None),
    ("write", "Checkpoint write (issue 6; vs direct multipart upload)", "direct-upload"),
]
# Targets of the issues: (scenario pattern, what, test).
TARGETS = [
    ("bucketfs/warm", "warm read with passthrough, 1st mount, >= 0.90x the local-disk read",
     lambda r: r["ratio"] is not None and r["ratio"] >= 0.9),
    ("bucketfs/warm-again", "warm read with passthrough, 2nd mount, >= 0.90x the local-disk read",
     lambda r: r["ratio"] is not None and r["ratio"] >= 0.9),
    ("bucketfs/replicas-N", "N cold replicas fetch <= 1.05x the model size",
     lambda r: r["fetched_per_model"] is not None and r["fetched_per_model"] <= 1.05),
    ("bucketfs/write", "write through the mount >= 0.80x the direct multipart upload",
     lambda r: r["ratio"] is not None and r["ratio"] >= 0.8),
]

LABELS = {
    "direct": "direct ranged GETs (baseline)",
    "direct-list": "direct LIST (baseline)",
    "direct-load": "download to disk, then load (baseline 2)",
    "direct-random": "direct random 4 MiB GETs, one after another (baseline 3)",
    "direct-small": "direct GETs, one after another (baseline)",
    "direct-small16": "direct GETs, 16 threads (baseline)",
    "bucketfs/seq": "bucketfs sequential (dd)",
    "bucketfs/random": "bucketfs random 4 MiB preads",
    "bucketfs/safetensors": "bucketfs safetensors load",
    "bucketfs/list": "bucketfs list+stat",
    "bucketfs/warm-fill": "bucketfs warm (fill the cache)",
    "local-disk": "local file, same disk (baseline)",
    "bucketfs/warm": "bucketfs warm read, passthrough, 1st mount",
    "bucketfs/warm-again": "bucketfs warm read, passthrough, 2nd mount",
    "bucketfs/warm-nopt": "bucketfs warm read, --no-passthrough",
    "direct-upload": "direct multipart upload (baseline)",
    "bucketfs/write": "bucketfs write (dd + close)",
}


def label(scenario):
    if scenario in LABELS:
        return LABELS[scenario]
    mount, _, test = scenario.partition("/")
    mount = MOUNT_LABELS.get(mount, mount)
    if test.startswith("replicas-"):
        n = int(test.split("-")[1])
        return f"{mount} x{n} replica{'s' if n > 1 else ''}" + (" (baseline)" if n == 1 else "")
    return f"{mount} {TEST_LABELS.get(test, test)}"


MOUNT_LABELS = {"bucketfs+cache": "bucketfs --cache-dir (cold)",
                "bucketfs-nopf": "bucketfs --small-file-prefetch 0",
                "mountpoint": "mountpoint-s3"}
TEST_LABELS = {"seq": "sequential (dd)", "random": "random 4 MiB preads",
               "safetensors": "safetensors load", "list": "list+stat",
               "small": "cat in order", "small16": "cat, 16 threads"}
SMALL_TESTS = ("small", "small16")


def group_of(scenario):
    if scenario == "direct-list" or scenario.endswith("/list"):
        return "list"
    if scenario.startswith("direct-small") or scenario.rpartition("/")[2] in SMALL_TESTS:
        return "small"
    if scenario in ("local-disk", "bucketfs/warm", "bucketfs/warm-again", "bucketfs/warm-nopt"):
        return "warm"
    if "/replicas-" in scenario:
        return "replicas"
    if scenario == "direct-upload" or scenario.endswith("/write"):
        return "write"
    return "read"


def baseline_of(scenario):
    group = group_of(scenario)
    if group == "replicas":
        return scenario.split("/")[0] + "/replicas-1"
    if group == "small":
        return "direct-" + scenario.rpartition("/")[2].removeprefix("direct-")
    return dict((g, b) for g, _, b in GROUPS)[group]


def summarize(runs):
    """One row per (scenario, latency): median of the successful runs and its ratio to the
    baseline's median at the same latency."""
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["latency_ms"]), []).append(r)

    def median_of(rs, key):
        v = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(v) if v else None

    medians = {}
    rows = []
    for (scenario, latency), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        values = [r["value"] for r in ok]
        row = {
            "scenario": scenario,
            "group": group_of(scenario),
            "baseline": baseline_of(scenario),
            "label": label(scenario),
            "latency_ms": latency,
            "metric": rs[0]["metric"],
            "runs_ok": len(ok),
            "runs_failed": len(rs) - len(ok),
            "median": statistics.median(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "values": values,
            "peak_rss_mib": None,
            "fetched_per_read": None,
            "errors": sorted({r["error"] for r in rs if r.get("error")}),
            # Issue 4 and 6 tests (None elsewhere).
            "fetched_per_model": median_of(ok, "fetched_per_model"),
            "aggregate_mib_s": median_of(ok, "aggregate_mib_s"),
            "uploaded_per_written": median_of(ok, "uploaded_per_written"),
            "daemon_cpu_s": median_of(ok, "daemon_cpu_s"),
            "daemon_cpu_s_per_gib": median_of(ok, "daemon_cpu_s_per_gib"),
            "machine_cpu_s_per_gib": median_of(ok, "machine_cpu_s_per_gib"),
            "machine_cpu_busy": median_of(ok, "machine_cpu_busy"),
            "requests_per_file": (statistics.median(r["requests"] / r["files"] for r in ok)
                                  if ok and all(r.get("requests") is not None and r.get("files")
                                                for r in ok) else None),
            "opens_by_io": _opens(ok),
            "notes": sorted({f"{k.replace('_', ' ')}: {r[k]}" for r in rs
                             for k in ("passthrough_off", "reopen_error") if r.get(k)}),
        }
        rss = [r["peak_rss_kib"] for r in rs if r.get("peak_rss_kib")]
        if rss:
            row["peak_rss_mib"] = max(rss) / 1024
        # Bytes the proxy returned from the bucket per byte the test read (listings: none).
        fetched = [r["fetched_bytes"] / r["bytes"] for r in ok
                   if r.get("fetched_bytes") is not None and r.get("bytes")
                   and r["metric"] == "MiB/s" and group_of(scenario) != "write"]
        if fetched:
            row["fetched_per_read"] = statistics.median(fetched)
        medians[(scenario, latency)] = row["median"]
        rows.append(row)
    def ratio_to(row, other):
        base = medians.get((other, row["latency_ms"]))
        return row["median"] / base if base and row["median"] is not None else None

    machine = {(r["scenario"], r["latency_ms"]): r["machine_cpu_s_per_gib"] for r in rows}

    for row in rows:
        row["ratio"] = ratio_to(row, row["baseline"])
        # Issue 15: a cold read with --cache-dir vs the same read without it; a safetensors
        # load vs "download to disk, then load".
        mount, _, test = row["scenario"].partition("/")
        row["ratio_nocache"] = (ratio_to(row, "bucketfs/" + test) if mount == "bucketfs+cache"
                                else None)
        row["ratio_load"] = ratio_to(row, "direct-load") if test == "safetensors" else None
        # Random preads vs the same ranges as direct GETs one after another.
        row["ratio_random"] = ratio_to(row, "direct-random") if test == "random" else None
        # What the ratio to the baseline can be while the machine's CPUs are the limit: the
        # baseline's machine CPU per GiB over this one's (see bench.MachineCpu), for the reads
        # of the whole file (random reads wait on one round trip after another instead).
        base_cpu = machine.get((row["baseline"], row["latency_ms"]))
        mine = row["machine_cpu_s_per_gib"] if test in ("seq", "safetensors") else None
        row["cpu_ceiling"] = (base_cpu / mine if base_cpu and mine
                              and row["baseline"] != row["scenario"] else None)
        nocache_cpu = machine.get(("bucketfs/" + test, row["latency_ms"]))
        row["cpu_ceiling_nocache"] = (nocache_cpu / mine if mount == "bucketfs+cache"
                                      and nocache_cpu and mine else None)
    order = {s: i for i, s in enumerate(dict.fromkeys(r["scenario"] for r in runs))}
    group_order = {g: i for i, (g, _, _) in enumerate(GROUPS)}
    rows.sort(key=lambda r: (group_order[r["group"]], r["latency_ms"], order[r["scenario"]]))
    return rows


def _opens(runs):
    """bucketfs_opens_total by io, as in the first successful run that has it ("-" if none)."""
    for r in runs:
        if r.get("opens_by_io"):
            return r["opens_by_io"]
    return None


def _opens_cell(r):
    o = r.get("opens_by_io")
    return " ".join(f"{k}:{v}" for k, v in sorted(o.items()) if v) if o else "-"


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def _xfmt(v):
    return _fmt(v, ".2f") + ("x" if v is not None else "")


def _ratio(r):
    return _fmt(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else "")


def _runs(r):
    return f"{r['runs_ok']}/{r['runs_ok'] + r['runs_failed']}"


def _rss(r):
    return _fmt(r["peak_rss_mib"], ".0f")


# Columns of each table: (header, cell of a summary row). Left-aligned: the first and "unit".
_COMMON_HEAD = [("scenario", lambda r: r["label"]), ("latency", lambda r: f"{r['latency_ms']} ms"),
                ("median", lambda r: _fmt(r["median"], ".1f", "FAILED")),
                ("unit", lambda r: r["metric"])]
COLUMNS = {
    "read": _COMMON_HEAD + [("vs baseline", _ratio),
                            ("vs download+load", lambda r: _xfmt(r.get("ratio_load"))),
                            ("vs direct random GETs", lambda r: _xfmt(r.get("ratio_random"))),
                            ("vs no cache", lambda r: _xfmt(r.get("ratio_nocache"))),
                            ("peak RSS MiB", _rss),
                            ("daemon CPU s/GiB",
                             lambda r: _fmt(r.get("daemon_cpu_s_per_gib"), ".2f")),
                            ("machine CPU s/GiB",
                             lambda r: _fmt(r.get("machine_cpu_s_per_gib"), ".2f")),
                            ("CPU busy", lambda r: _fmt(r.get("machine_cpu_busy"), ".0%")),
                            ("CPU ceiling", lambda r: _xfmt(r.get("cpu_ceiling"))),
                            ("fetched/read", lambda r: _fmt(r["fetched_per_read"], ".2f")),
                            ("runs ok", _runs)],
    "small": _COMMON_HEAD + [("vs direct", _ratio), ("peak RSS MiB", _rss),
                             ("daemon CPU s", lambda r: _fmt(r.get("daemon_cpu_s"), ".2f")),
                             ("requests/file", lambda r: _fmt(r.get("requests_per_file"), ".2f")),
                             ("runs ok", _runs)],
    "warm": _COMMON_HEAD + [("vs local file", _ratio), ("peak RSS MiB", _rss),
                            ("daemon CPU s", lambda r: _fmt(r["daemon_cpu_s"], ".2f")),
                            ("fetched/read", lambda r: _fmt(r["fetched_per_read"], ".2f")),
                            ("opens by io", _opens_cell),
                            ("runs ok", _runs)],
    "replicas": [("scenario", lambda r: r["label"]),
                 ("latency", lambda r: f"{r['latency_ms']} ms"),
                 ("wall s", lambda r: _fmt(r["median"], ".2f", "FAILED")),
                 ("vs 1 replica", _ratio),
                 ("MiB/s in all", lambda r: _fmt(r["aggregate_mib_s"], ".1f")),
                 ("fetched/model", lambda r: _fmt(r["fetched_per_model"], ".2f")),
                 ("peak RSS MiB", _rss), ("runs ok", _runs)],
    "write": _COMMON_HEAD + [("vs direct", _ratio), ("peak RSS MiB", _rss),
                             ("uploaded/written", lambda r: _fmt(r["uploaded_per_written"], ".2f")),
                             ("runs ok", _runs)],
}
COLUMNS["list"] = [c for c in COLUMNS["read"]
                   if c[0] not in ("vs download+load", "vs direct random GETs", "vs no cache",
                                   "daemon CPU s/GiB", "machine CPU s/GiB", "CPU busy",
                                   "CPU ceiling")]


def _one_table(rows, columns, markdown):
    head = [h for h, _ in columns]
    lines = [[cell(r) for _, cell in columns] for r in rows]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return out + ["| " + " | ".join(line) + " |" for line in lines]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    left = {0, head.index("unit")} if "unit" in head else {0}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]


def targets(rows):
    """The issues' targets, as measured: (what, latency, value shown, met or not)."""
    out = []
    for pattern, what, test in TARGETS:
        for r in rows:
            if pattern.endswith("-N"):
                n = r["scenario"].rpartition("-")[2]
                hit = (r["scenario"].startswith(pattern[:-1]) and n.isdigit() and int(n) > 1)
            else:
                hit = r["scenario"] == pattern
            if not hit:
                continue
            if r["median"] is None:
                out.append((what, r["latency_ms"], "failed", False))
                continue
            shown = (f"{r['fetched_per_model']:.2f}x" if r["fetched_per_model"] is not None
                     and pattern.endswith("-N") else _ratio(r))
            out.append((what.replace("N cold", f"{r['scenario'].rpartition('-')[2]} cold"),
                        r["latency_ms"], shown, test(r)))
    return out


PEER_MOUNTS = ("s3fs", "s3fs+cache", "rclone", "rclone+cache", "mountpoint")


def issue15_targets(rows):
    """The "What it must show" list of issue 15, as measured: (what, latency, shown, met)."""
    by = {(r["scenario"], r["latency_ms"]): r for r in rows}
    out = []

    def ratio(row, what, latency, value, op, limit, ceiling=None):
        if row is None:
            return
        if value is None:
            out.append((what, latency, "failed" if row["median"] is None else "-", False))
            return
        met = value >= limit if op == ">=" else value <= limit
        shown = f"{value:.2f}x"
        if ceiling is not None and not met:
            shown += f"; the machine's CPUs allow {ceiling:.2f}x"
        out.append((what, latency, shown, met))

    for latency in sorted({r["latency_ms"] for r in rows}):
        def row(s):
            return by.get((s, latency))
        r = row("bucketfs/seq")
        ratio(r, "cold dd >= 1.0x the direct download", latency, r and r["ratio"], ">=", 1.0,
              r and r["cpu_ceiling"])
        r = row("bucketfs+cache/seq")
        ratio(r, "cold dd with --cache-dir >= 0.95x the same without", latency,
              r and r["ratio_nocache"], ">=", 0.95, r and r["cpu_ceiling_nocache"])
        r = row("bucketfs/safetensors")
        ratio(r, "safetensors load >= 0.9x the direct download", latency, r and r["ratio"],
              ">=", 0.9, r and r["cpu_ceiling"])
        ratio(r, "safetensors load >= 2x download then load", latency, r and r["ratio_load"],
              ">=", 2.0)
        if latency > 0:
            r = row("bucketfs/random")
            ratio(r, "random 4 MiB preads >= 0.5x the direct download", latency,
                  r and r["ratio"], ">=", 0.5)
            nopf = row("bucketfs-nopf/small")
            if nopf is not None:
                ratio(nopf, "cat of small files, prefetch off, <= 1.1x the direct GETs' time",
                      latency, nopf["ratio"], "<=", 1.1)
                r = row("bucketfs/small")
                ratio(r, "cat of small files, prefetch on, <= 0.3x the direct GETs' time",
                      latency, r and r["ratio"], "<=", 0.3)
            else:
                r = row("bucketfs/small")
                ratio(r, "cat of small files <= 1.1x the direct GETs' time", latency,
                      r and r["ratio"], "<=", 1.1)
            r = row("bucketfs/small16")
            ratio(r, "cat of small files, 16 threads, <= 1.2x the direct 16-thread GETs' time",
                  latency, r and r["ratio"], "<=", 1.2)
        # Ahead of every peer measured: higher MiB/s, or less time for the small files.
        for test in ("seq", "random", "safetensors", "small", "small16"):
            mine = row(f"bucketfs/{test}")
            peers = [row(f"{p}/{test}") for p in PEER_MOUNTS]
            peers = [p for p in peers if p is not None]
            if mine is None or not peers:
                continue
            lower = test in SMALL_TESTS
            done = [p for p in peers if p["median"] is not None]
            if mine["median"] is None:
                out.append((f"ahead of every peer: {TEST_LABELS[test]}", latency, "failed",
                            False))
                continue
            best = (min if lower else max)(done, key=lambda p: p["median"]) if done else None
            if best is None:
                out.append((f"ahead of every peer: {TEST_LABELS[test]}", latency,
                            "every peer failed", True))
                continue
            met = mine["median"] < best["median"] if lower else mine["median"] > best["median"]
            unit = "s" if lower else "MiB/s"
            out.append((f"ahead of every peer: {TEST_LABELS[test]}", latency,
                        f"{mine['median']:.1f} {unit} vs {best['median']:.1f} "
                        f"({label(best['scenario']).split(' ')[0]})", met))
    rss = [r for r in rows if r["scenario"].startswith("bucketfs") and r["peak_rss_mib"]
           and r["group"] in ("read", "small")]
    if rss:
        worst = max(rss, key=lambda r: r["peak_rss_mib"])
        out.append(("bucketfs peak RSS <= 256 MiB (cold reads and small files)",
                    worst["latency_ms"], f"{worst['peak_rss_mib']:.0f} MiB ({worst['label']})",
                    worst["peak_rss_mib"] <= 256))
    return out


def table(rows, markdown=False):
    """One table per group of scenarios, then failures, notes and the issues' targets."""
    out = []
    for group, title, _ in GROUPS:
        mine = [r for r in rows if r.get("group", group_of(r["scenario"])) == group]
        if not mine:
            continue
        if out:
            out.append("")
        out.append(f"#### {title}" if markdown else f"{title}:")
        if markdown:
            out.append("")
        out += _one_table(mine, COLUMNS[group], markdown)
    notes = [f"{r['label']} at {r['latency_ms']} ms failed: {e}" for r in rows for e in r["errors"]]
    notes += [f"{r['label']} at {r['latency_ms']} ms: {n}" for r in rows
              for n in r.get("notes", [])]
    if notes:
        out.append("")
        out += [("- " if markdown else "") + n for n in notes]
    goals = targets(rows) + issue15_targets(rows)
    if goals:
        out.append("")
        out.append("Targets (as measured):")
        if markdown:
            out.append("")
        for what, latency, shown, met in goals:
            out.append(f"{'- ' if markdown else '  '}{what}, at {latency} ms: {shown} "
                       f"({'met' if met else 'NOT met'})")
    return "\n".join(out)


def _panel(ax, rows, latencies, *, log_scale, ylabel, title, extra=None):
    """Bars of the median per scenario (x) and latency (colour), min-max whiskers; each
    scenario's baseline hatched, labels: the value and the ratio to the baseline (plus
    extra(row) when given)."""
    import matplotlib.patches
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = plt.get_cmap("tab10")
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    by = {(r["scenario"], r["latency_ms"]): r for r in rows}
    w = 0.8 / len(latencies)
    for j, lat in enumerate(latencies):
        xs, hs, lo, hi, hatch = [], [], [], [], []
        for i, s in enumerate(scen):
            r = by.get((s, lat))
            x = i - 0.4 + w * (j + 0.5)
            if r is None:
                continue
            if r["median"] is None:
                ax.text(x, 0.02, "failed", rotation=90, ha="center", va="bottom",
                        fontsize=8, color="red", transform=ax.get_xaxis_transform())
                continue
            xs.append(x)
            hs.append(r["median"])
            lo.append(r["median"] - r["min"])
            hi.append(r["max"] - r["median"])
            hatch.append(s == r["baseline"])
            v = r["median"]
            text = f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"
            if r["ratio"] is not None and s != r["baseline"]:
                text += f"\n{r['ratio']:.2f}x"
            if extra and s != r["baseline"] and extra(r):
                text += "\n" + extra(r)
            ax.annotate(text, (x, r["max"]), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        bars = ax.bar(xs, hs, w, yerr=[lo, hi], capsize=2, color=colors(j),
                      edgecolor="black", linewidth=0.5)
        for b, is_base in zip(bars, hatch):
            if is_base:
                b.set_hatch("//")
        bases = {r["baseline"] for r in rows}
        if len(bases) == 1:
            base = by.get((bases.pop(), lat))
            if base and base["median"]:
                ax.axhline(base["median"], color=colors(j), linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(scen)))
    ax.set_xticklabels([label(s) for s in scen], rotation=30, ha="right", fontsize=8)
    if log_scale:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(y=0.25)
    else:
        ax.set_ylim(0, max([r["max"] for r in rows if r["max"] is not None] or [1]) * 1.3)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    # Plain patches: the first bar of a series may be a hatched baseline.
    ax.legend(handles=[matplotlib.patches.Patch(facecolor=colors(j), edgecolor="black",
                                                linewidth=0.5, label=f"{lat} ms per request")
                       for j, lat in enumerate(latencies)], fontsize=8, loc="upper right")
    ax.grid(axis="y", which="both", alpha=0.3)


def _figure(data, groups, path, caption):
    """One panel per group present; returns the path, or None if no group had rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["summary"] if r.get("group", group_of(r["scenario"])) in groups]
    present = [g for g in groups if any(r.get("group", group_of(r["scenario"])) == g
                                        for r in rows)]
    if not present:
        return None
    latencies = sorted({r["latency_ms"] for r in rows})
    widths = [max(1, len({r["scenario"] for r in rows if r.get("group", group_of(r["scenario"]))
                          == g})) for g in present]
    fig, axes = plt.subplots(1, len(present), figsize=(min(22, 4 + 1.4 * sum(widths)), 6.8),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    p = data["params"]
    for ax, g in zip(axes[0], present):
        mine = [r for r in rows if r.get("group", group_of(r["scenario"])) == g]
        for r in mine:  # summaries written before groups existed
            r.setdefault("baseline", baseline_of(r["scenario"]))
        if g == "read":
            _panel(ax, mine, latencies, log_scale=True,
                   ylabel="MiB/s (median of runs; log scale)", title="reads of the model file")
        elif g == "small":
            _panel(ax, mine, latencies, log_scale=True,
                   ylabel="seconds (median of runs; log scale; lower is better)",
                   title=f"cat of {p['small_files']} small files, fresh mount")
        elif g == "list":
            _panel(ax, mine, latencies, log_scale=True,
                   ylabel="files/s (median of runs; log scale)",
                   title=f"listing + stat of {p['small_files']} small files")
        elif g == "warm":
            _panel(ax, mine, latencies, log_scale=False, ylabel="MiB/s (median of runs)",
                   title="warm read of the model: full disk cache vs the local file (issue 4)")
        elif g == "replicas":
            _panel(ax, mine, latencies, log_scale=False,
                   ylabel="wall seconds until every replica has read the model (lower is better)",
                   title=f"{p.get('replicas', 'N')} replicas sharing one cache dir, cold, vs 1 "
                         "(issue 4)",
                   extra=lambda r: (f"fetch {r['fetched_per_model']:.2f}x"
                                    if r.get("fetched_per_model") is not None else ""))
        elif g == "write":
            _panel(ax, mine, latencies, log_scale=False, ylabel="MiB/s (median of runs)",
                   title=f"writing a {p.get('write_size_human', '')} checkpoint (issue 6)",
                   extra=lambda r: (f"up {r['uploaded_per_written']:.2f}x"
                                    if r.get("uploaded_per_written") is not None
                                    and abs(r["uploaded_per_written"] - 1) >= 0.005 else ""))
    fig.suptitle(caption.format(model=p["model_size_human"], runs=p["runs"],
                                cpus=data["machine"]["nproc"]), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(data, path):
    """The cold-read and listing chart (latest.png)."""
    return _figure(data, ["read", "small", "list"], path,
                   "bucketfs model-loading benchmark: model {model}, {runs} run(s), {cpus} CPUs; "
                   "hatched bar and dashed line = baseline (labels: value, ratio to baseline)")


def plot_issues(data, path):
    """The disk cache, replica and write chart (latest-cache-write.png), if any were run."""
    return _figure(data, ["warm", "replicas", "write"], path,
                   "bucketfs disk cache and write path: model {model}, {runs} run(s), {cpus} "
                   "CPUs; hatched = baseline (labels: value, ratio to its baseline)")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--png")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--png2", help="also draw the disk cache / replica / write chart here")
    a = ap.parse_args()
    with open(a.json) as f:
        data = json.load(f)
    # Recomputed from the raw runs, so that files written by older versions print the same way.
    data["summary"] = summarize(data["runs"])
    print(table(data["summary"], markdown=a.markdown))
    if a.png:
        plot(data, a.png)
    if a.png2 and plot_issues(data, a.png2) is None:
        print("(no disk cache, replica or write results to draw)")


if __name__ == "__main__":
    main()
