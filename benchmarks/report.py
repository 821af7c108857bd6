"""Turns a pytest-benchmark JSON run of the suite into benchmarks/results/<device>.json, a markdown table of
ratios (kdfast vs each baseline) and a PNG bar chart.

    python benchmarks/report.py RUN.json [RUN.json ...] [--name cpu-2core]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def rows_of(run: dict) -> list:
    rows = []
    for b in run["benchmarks"]:
        info = b["extra_info"]
        median = b["stats"]["median"]
        rows.append({
            "op": info["op"], "workload": info["workload"], "impl": info["impl"], "device": info["device"],
            "median_ms": median * 1e3, "min_ms": b["stats"]["min"] * 1e3, "rounds": b["stats"]["rounds"],
            "peak_mib": info["peak_bytes"] / 2**20, "bytes": info["bytes"], "flops": info.get("flops", 0.0),
            "achieved_gbs": info["bytes"] / median / 1e9 if info["bytes"] else None,
            "achieved_gflops": info.get("flops", 0.0) / median / 1e9 if info.get("flops") else None,
            **{k: v for k, v in info.items() if k not in ("op", "workload", "impl", "device", "peak_bytes", "bytes",
                                                          "flops")},
        })
    return rows


def ratios(rows: list) -> list:
    """For each (op, workload): kdfast's speed-up and memory saving against every other impl."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["op"], r["workload"])][r["impl"]] = r
    out = []
    for (op, workload), impls in sorted(by.items()):
        k = impls.get("kdfast")
        if k is None:
            continue
        for name, other in sorted(impls.items()):
            if name == "kdfast":
                continue
            out.append({"op": op, "workload": workload, "baseline": name,
                        "speedup": other["median_ms"] / k["median_ms"],
                        "memory_ratio": other["peak_mib"] / k["peak_mib"] if k["peak_mib"] > 0 else None})
    return out


def markdown(rows: list, rat: list, bandwidth: float | None, title: str) -> str:
    lines = [f"# {title}", ""]
    if bandwidth:
        lines += [f"Measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (bytes read + written).", ""]
    lines += ["| op | workload | impl | median ms | peak MiB | must-move GB/s | % of copy bw |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["op"], r["workload"], r["impl"])):
        gbs = r["achieved_gbs"]
        pct = f"{100 * gbs * 1e9 / bandwidth:.0f}%" if gbs and bandwidth else ""
        lines.append(f"| {r['op']} | {r['workload']} | {r['impl']} | {r['median_ms']:.2f} | {r['peak_mib']:.1f} | "
                     f"{gbs:.1f} | {pct} |" if gbs else
                     f"| {r['op']} | {r['workload']} | {r['impl']} | {r['median_ms']:.2f} | {r['peak_mib']:.1f} | | |")
    lines += ["", "kdfast against each baseline (higher is better for kdfast):", "",
              "| op | workload | baseline | speed-up | peak-memory ratio |", "|---|---|---|---:|---:|"]
    for r in rat:
        mem = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] else ""
        lines.append(f"| {r['op']} | {r['workload']} | {r['baseline']} | {r['speedup']:.2f}x | {mem} |")
    return "\n".join(lines) + "\n"


def chart(rat: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({f"{r['op']}/{r['workload']}" for r in rat})
    baselines = sorted({r["baseline"] for r in rat})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) * len(baselines)), 4.5))
    width = 0.8 / max(1, len(baselines))
    for j, base in enumerate(baselines):
        vals = {f"{r['op']}/{r['workload']}": r["speedup"] for r in rat if r["baseline"] == base}
        xs = [i + j * width for i in range(len(labels))]
        ax.bar(xs, [vals.get(lbl, 0) for lbl in labels], width, label=f"vs {base}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + width * (len(baselines) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("speed-up of kdfast (forward + backward)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="pytest-benchmark JSON files of one machine (merged)")
    ap.add_argument("--name", help="result name (default: cpu-<cores>core or the GPU's name)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    run = None
    for path in args.runs:
        with open(path) as f:
            part = json.load(f)
        if run is None:
            run = part
        else:
            run["benchmarks"] += part["benchmarks"]
    mi = run["machine_info"]
    name = args.name or (mi.get("gpu", "").split()[-1].lower() if mi.get("gpu") else f"cpu-{os.cpu_count()}core")
    rows, bandwidth = rows_of(run), mi.get("kdfast_copy_bandwidth")
    rat = ratios(rows)
    os.makedirs(args.out, exist_ok=True)
    result = {"name": name, "datetime": run.get("datetime"), "torch": mi.get("torch"), "cpu": mi.get("cpu", {}).get(
        "brand_raw"), "gpu": mi.get("gpu"), "threads": mi.get("torch_threads"), "copy_bandwidth": bandwidth,
        "rows": rows, "ratios": rat}
    base = os.path.join(args.out, name)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, rat, bandwidth, f"kdfast benchmarks on {name}"))
    chart(rat, base + ".png", f"kdfast speed-up on {name}")
    print(open(base + ".md").read())
    print(f"wrote {base}.json, {base}.md, {base}.png")


if __name__ == "__main__":
    main()
