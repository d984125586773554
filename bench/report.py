#!/usr/bin/env python3
"""Summary table and chart of a benchmark run (bench/results/*.json).

    python3 bench/report.py bench/results/latest.json [--png OUT.png] [--markdown]

reprints the table of a finished run and redraws its chart; bench.py uses the same functions.
"""

import argparse
import json
import statistics

# Which baseline each metric is compared with.
BASELINE = {"MiB/s": "direct", "files/s": "direct-list"}

LABELS = {
    "direct": "direct ranged GETs (baseline)",
    "direct-list": "direct LIST (baseline)",
    "bucketfs/seq": "bucketfs sequential (dd)",
    "bucketfs/random": "bucketfs random 4 MiB preads",
    "bucketfs/safetensors": "bucketfs safetensors load",
    "bucketfs/list": "bucketfs list+stat",
}


def label(scenario):
    if scenario in LABELS:
        return LABELS[scenario]
    mount, _, test = scenario.partition("/")
    return f"{mount} {dict(seq='sequential (dd)', random='random 4 MiB preads', safetensors='safetensors load', list='list+stat').get(test, test)}"


def summarize(runs):
    """One row per (scenario, latency): median of the successful runs and its ratio to the
    baseline's median at the same latency."""
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["latency_ms"]), []).append(r)
    medians = {}
    rows = []
    for (scenario, latency), rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        values = [r["value"] for r in ok]
        row = {
            "scenario": scenario,
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
        }
        rss = [r["peak_rss_kib"] for r in rs if r.get("peak_rss_kib")]
        if rss:
            row["peak_rss_mib"] = max(rss) / 1024
        # Bytes the proxy returned from the bucket per byte the test read (listings: none).
        fetched = [r["fetched_bytes"] / r["bytes"] for r in ok
                   if r.get("fetched_bytes") is not None and r.get("bytes")
                   and r["metric"] == "MiB/s"]
        if fetched:
            row["fetched_per_read"] = statistics.median(fetched)
        medians[(scenario, latency)] = row["median"]
        rows.append(row)
    for row in rows:
        base = medians.get((BASELINE.get(row["metric"]), row["latency_ms"]))
        row["ratio"] = row["median"] / base if base and row["median"] is not None else None
    order = {s: i for i, s in enumerate(dict.fromkeys(r["scenario"] for r in runs))}
    rows.sort(key=lambda r: (r["latency_ms"], r["metric"] != "MiB/s", order[r["scenario"]]))
    return rows


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def table(rows, markdown=False):
    head = ["scenario", "latency", "median", "unit", "vs baseline", "peak RSS MiB",
            "fetched/read", "runs ok"]
    lines = []
    for r in rows:
        median = _fmt(r["median"], ".1f", "FAILED")
        lines.append([
            r["label"], f"{r['latency_ms']} ms", median, r["metric"],
            _fmt(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""),
            _fmt(r["peak_rss_mib"], ".0f"), _fmt(r["fetched_per_read"], ".2f"),
            f"{r['runs_ok']}/{r['runs_ok'] + r['runs_failed']}",
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        fmt = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    errors = [(r, e) for r in rows for e in r["errors"]]
    for r, e in errors:
        out.append(("" if not markdown else "\n") +
                   f"{r['label']} at {r['latency_ms']} ms failed: {e}")
    return "\n".join(out)


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = data["summary"]
    latencies = sorted({r["latency_ms"] for r in rows})
    panels = [m for m in ("MiB/s", "files/s") if any(r["metric"] == m for r in rows)]
    widths = [max(1, len({r["scenario"] for r in rows if r["metric"] == m})) for m in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(min(22, 4 + 1.3 * sum(widths)), 6.5),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    colors = plt.get_cmap("tab10")
    p = data["params"]
    for ax, metric in zip(axes[0], panels):
        scen = list(dict.fromkeys(r["scenario"] for r in rows if r["metric"] == metric))
        by = {(r["scenario"], r["latency_ms"]): r for r in rows}
        n = len(latencies)
        w = 0.8 / n
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
                hatch.append(s == BASELINE[metric])
                ratio = "" if r["ratio"] is None else f"\n{r['ratio']:.2f}x"
                ax.annotate(f"{r['median']:.0f}{ratio}", (x, r["max"]), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
            bars = ax.bar(xs, hs, w, yerr=[lo, hi], capsize=2, color=colors(j),
                          label=f"{lat} ms per request", edgecolor="black", linewidth=0.5)
            for b, is_base in zip(bars, hatch):
                if is_base:
                    b.set_hatch("//")
            base = by.get((BASELINE[metric], lat))
            if base and base["median"]:
                ax.axhline(base["median"], color=colors(j), linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels([label(s) for s in scen], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel(f"{metric} (median of runs; log scale)")
        ax.margins(y=0.25)
        ax.set_title("reads of the model file" if metric == "MiB/s"
                     else f"listing + stat of {p['small_files']} small files", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(
        f"bucketfs model-loading benchmark: model {p['model_size_human']}, {p['runs']} run(s), "
        f"{data['machine']['nproc']} CPUs; hatched bar and dashed line = baseline "
        f"(labels: value, ratio to baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--png")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    with open(a.json) as f:
        data = json.load(f)
    print(table(data["summary"], markdown=a.markdown))
    if a.png:
        plot(data, a.png)


if __name__ == "__main__":
    main()
