#!/usr/bin/env python3
"""Plots TCP throughput from `rally-lab bench` results: Rally (direct and relayed) against
boringtun-cli, wireguard-go and the raw veth path, median bars with min-max whiskers.

    python3 scripts/plot_bench.py target/release/bench/bench-results.json docs/benchmarks-throughput.png

Installs matplotlib with pip when it is missing.
"""

import json
import subprocess
import sys


def need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_bench: installing matplotlib with pip", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"])


def median(v):
    s = sorted(x for x in v if x == x)
    if not s:
        return float("nan")
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    results = json.load(open(src))
    figs = [f for f in results["figures"] if f["group"] == "throughput"]
    if not figs:
        sys.exit(f"{src} has no throughput figures")
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = ["raw veth", "rally (direct)", "rally (relay)", "boringtun-cli", "wireguard-go"]
    colors = {
        "raw veth": "#9e9e9e",
        "rally (direct)": "#1565c0",
        "rally (relay)": "#64b5f6",
        "boringtun-cli": "#ef6c00",
        "wireguard-go": "#2e7d32",
    }
    metrics = []
    for f in figs:
        if f["metric"] not in metrics:
            metrics.append(f["metric"])
    subjects = [s for s in subjects if any(f["subject"] == s for f in figs)]
    width = 0.8 / len(subjects)
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    for j, s in enumerate(subjects):
        xs, ys, lo, hi = [], [], [], []
        for i, m in enumerate(metrics):
            f = next((f for f in figs if f["metric"] == m and f["subject"] == s), None)
            if f is None:
                continue
            v = [x for x in f["samples"] if x is not None and x == x]
            if not v:
                continue
            med = median(v)
            xs.append(i + (j - (len(subjects) - 1) / 2) * width)
            ys.append(med)
            lo.append(med - min(v))
            hi.append(max(v) - med)
        bars = ax.bar(xs, ys, width, label=s, color=colors.get(s), yerr=[lo, hi], capsize=3)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.0f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylabel("Mbit/s (median, whiskers min–max)")
    m = results.get("machine", {})
    ax.set_title(
        f"TCP throughput through each tunnel between two lab namespaces (iperf3, "
        f"{results.get('runs', '?')} runs × {results.get('seconds', '?')} s)\n"
        f"shared {m.get('nproc', '?')}-core {m.get('cpu', '')}, kernel {m.get('kernel', '')}",
        fontsize=9,
    )
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=len(subjects), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(dst)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
