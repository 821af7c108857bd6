"""The GPU check's results as markdown: per call the device line, the steps, the op checks, the CUDA tests, the
sanitizer verdicts, the benchmark table (kdfast against each baseline, share of the copy bandwidth, peak memory)
and the GPU targets with their verdicts. Used on the device (after every step) and by `gpu_check.py report`.
"""
from __future__ import annotations

from collections import defaultdict

ROW = "@@ROW "  # the prefix of a measured row on a worker's stdout
BASELINES = ("eager", "cusolver", "compiled", "liger")

# (what, row id, {measure: bound}): "x <impl>" = that impl's time / kdfast's >= bound; "bw" = kdfast's must-move
# bytes per second / the copy's >= bound; "ms" and "peak_gb" = kdfast's time and peak memory <= bound.
TARGETS = [
    ("kd_div llm fp32: >= 85% of copy bandwidth, >= 2x torch.compile", "kd_div/llm-8k/float32",
     {"bw": 0.85, "x compiled": 2.0}),
    ("kd_div llm bf16: >= 85% of copy bandwidth, >= 2x torch.compile", "kd_div/llm-8k/bfloat16",
     {"bw": 0.85, "x compiled": 2.0}),
    *[(f"{op} {w} fp32: >= 1.5x torch.compile", f"{op}/{w}/float32", {"x compiled": 1.5})
      for op in ("kd_div", "kd_loss") for w in ("cifar", "imagenet")],
    ("kd_div fwd+bwd on 2 x 2: per-call cost <= eager PyTorch's", "kd_div/per-call-2x2/float32", {"x eager": 1.0}),
    ("fused_linear_kd on Liger's shape: <= 40 ms and <= 6 GB peak", "fused_linear_kd/liger-8k-128k/bfloat16",
     {"ms": 40.0, "peak_gb": 6.0}),
    ("attention transfer, ImageNet stages: >= 1.5x torch.compile", "attention_transfer/imagenet-b256/bfloat16",
     {"x compiled": 1.5}),
    ("pairwise n = 4096: >= 1.5x torch.compile", "pairwise_affinity/n4096/float32", {"x compiled": 1.5}),
    ("pairwise n = 65536: >= 1.5x torch.compile", "pairwise_affinity/n65536/float32", {"x compiled": 1.5}),
    ("batched SVD 32 x 32: >= 5x cuSOLVER", "batched_svd/svd32/float32", {"x cusolver": 5.0}),
]


def _f(x, fmt="{:.3g}") -> str:
    return "" if x is None else fmt.format(x)


def _by_row(bench: list) -> dict:
    rows = defaultdict(dict)
    for r in bench:
        if "row" in r:
            rows[r["row"]][r["impl"]] = r
    return rows


def _copy_gbs(bench: list):
    return next((r["gbs"] for r in bench if r["op"] == "copy"), None)


def _measure(impls: dict, what: str, copy_gbs):
    k = impls.get("kdfast", {})
    if k.get("status") != "ok":
        return None
    if what.startswith("x "):
        other = impls.get(what[2:], {})
        return other["median_ms"] / k["median_ms"] if other.get("status") == "ok" else None
    if what == "bw":
        return k["gbs"] / copy_gbs if copy_gbs else None
    if what == "ms":
        return k["median_ms"]
    return k["peak_bytes"] / 1e9 if k.get("peak_bytes") is not None else None


def targets(call: dict) -> list:
    """(target, measured, verdict) for each GPU target, and the sanitizer's."""
    rows, copy_gbs = _by_row(call.get("bench", [])), _copy_gbs(call.get("bench", []))
    out = []
    for what, row, bounds in TARGETS:
        got = {m: _measure(rows.get(row, {}), m, copy_gbs) for m in bounds}
        if any(v is None for v in got.values()):
            verdict = "not measured"
        else:
            met = all(v <= bounds[m] if m in ("ms", "peak_gb") else v >= bounds[m] for m, v in got.items())
            verdict = "met" if met else "MISSED"
        out.append((what, ", ".join(f"{m} {_f(v)}" for m, v in got.items()), verdict))
    for tool in ("memcheck", "racecheck"):
        s = call.get("sanitizer", {}).get(tool)
        if s:
            verdict = {"ok": "met", "cannot-run": "could not run"}.get(s["status"], "MISSED")
            verdict = "not checked (dry run)" if call.get("dry_run") else verdict
            out.append((f"{tool}: zero findings", s.get("detail", ""), verdict))
    return out


def _call(call: dict, brief: bool) -> list:
    env = call.get("env", {})
    lines = [f"## {call['call']}{' (dry run)' if call.get('dry_run') else ''}, started {call['started']}", "",
             f"Device: {env.get('device_line', 'not read')}", "",
             f"Commit: {env.get('commit', 'unknown')}; sources sha256 {env.get('sources_sha256', '?')[:16]}", "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {str(s.get('detail', ''))[:300]} |".replace("\n", " ")
              for s in call["steps"]]
    if brief:
        return lines + [""]
    if call.get("ops"):
        lines += ["", "### Every op on the device against the CPU kernels and the float64 reference", "",
                  "Relative error ||result - expected|| / ||expected|| over the output and the gradients.", "",
                  "| case | dtype | vs CPU kernels | vs float64 reference | tolerance | status |",
                  "|---|---|---:|---:|---:|---|"]
        lines += [f"| {r['case']} | {r['dtype']} | {_f(r.get('vs_cpu'), '{:.2e}')} | "
                  f"{_f(r.get('vs_reference'), '{:.2e}')} | {_f(r.get('tolerance'), '{:.0e}')} | {r['status']} "
                  f"{r.get('detail', '')} |" for r in call["ops"]]
    if call.get("tests"):
        t = call["tests"]
        lines += ["", f"### CUDA tests (`pytest -k cuda`): {t['summary']}", ""] + [f"- {f}" for f in t["failures"]]
    if call.get("sanitizer"):
        lines += ["", "### compute-sanitizer (curated cases, kdfast's kernels)", ""]
        lines += [f"- {tool}: {s['status']}: {s.get('detail', '')}" for tool, s in call["sanitizer"].items()]
    if call.get("bench"):
        lines += _bench(call["bench"])
    verdicts = targets(call)
    if verdicts and (call.get("bench") or call.get("sanitizer")):
        lines += ["", "### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {w} | {m} | {v} |" for w, m, v in verdicts]
    return lines + [""]


def _bench(bench: list) -> list:
    copy_gbs = _copy_gbs(bench)
    lines = ["", "### Benchmarks: forward + backward, median of CUDA-event timings", "",
             f"Copy bandwidth (device to device, bytes read + written): {_f(copy_gbs, '{:.0f}')} GB/s.", "",
             "| row | impl | median ms | x kdfast | must-move GB/s | % of copy | peak MiB | loss | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row, impls in _by_row(bench).items():
        k = impls.get("kdfast", {})
        for name, r in impls.items():
            ok = r.get("status") == "ok"
            ratio = r["median_ms"] / k["median_ms"] if ok and k.get("status") == "ok" and name != "kdfast" else None
            pct = 100 * r["gbs"] / copy_gbs if ok and copy_gbs and r.get("bytes") else None
            peak = r["peak_bytes"] / 2**20 if r.get("peak_bytes") is not None else None
            lines.append(f"| {row} | {name} | {_f(r.get('median_ms'), '{:.4g}')} | {_f(ratio, '{:.2f}')} | "
                         f"{_f(r.get('gbs') if ok else None, '{:.0f}')} | {_f(pct, '{:.0f}%')} | "
                         f"{_f(peak, '{:.0f}')} | {_f(r.get('value'), '{:.6g}')} | {r['status']} "
                         f"{r.get('detail', '')[:120]} |")
    return lines


def markdown(calls: list, brief: bool = False) -> str:
    """The report of one or more calls (`brief`: the steps only, for the end of a device call's output)."""
    name = calls[0]["name"] if calls else "?"
    lines = [f"# GPU check: {name}", ""]
    if not brief:
        lines += ["x kdfast = that implementation's time / kdfast's (above 1: kdfast is faster). Must-move bytes: "
                  "each input read and each output written once per forward + backward. Loss: the value each "
                  "implementation computed on the row's inputs (they should agree).", ""]
    for call in calls:
        lines += _call(call, brief)
    return "\n".join(lines)
