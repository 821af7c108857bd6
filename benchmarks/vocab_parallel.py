"""Vocabulary-parallel losses on 2 gloo ranks (CPU, one thread each) against kd_div on a shard of the same size,
measured side by side: each rank times, in interleaved rounds, one forward + backward of the vocabulary-parallel
loss over its shard and one of kd_div / topk_kd_div on that shard alone (both ranks busy in both), and its extra
peak resident memory (VmHWM after `echo 5 > /proc/self/clear_refs`, less the resident size before the step).

    python -m benchmarks.vocab_parallel [--rows 1024] [--shard 16000] [--rounds 7] [--out FILE.md]

Targets: extra peak per rank <= 1.25x its gradient shard; time per rank <= 1.2x kd_div on the shard.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfast

T = 2.0
K = 64


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _extra_peak(step) -> int:
    """Resident bytes step() adds at its peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    step()
    return _status("VmHWM") - before


def _steps(rank, rows, shard):
    g = torch.Generator().manual_seed(rank)
    s = (torch.randn(rows, shard, generator=g) * 3).requires_grad_(True)
    t = torch.randn(rows, shard, generator=g) * 3
    idx = torch.randint(0, 2 * shard, (rows, K), generator=torch.Generator().manual_seed(9))
    lp = torch.randn(rows, K, generator=torch.Generator().manual_seed(8)).log_softmax(-1) - 1.0
    local_idx = idx % shard  # the shard-sized problem of the single-process row
    counts = torch.randint(0, 4, (rows, K), generator=torch.Generator().manual_seed(7))  # 0: padding
    sampled, local_sampled = kdfast.Sampled(idx, counts, lp), kdfast.Sampled(local_idx, counts, lp)

    def run(loss):
        loss.backward()
        s.grad = None

    vp = kdfast.distributed
    return {
        "vocab_parallel_kd_div (kl)": lambda: run(vp.vocab_parallel_kd_div(s, t, T)),
        "kd_div on the shard (kl)": lambda: run(kdfast.kd_div(s, t, T)),
        "vocab_parallel_kd_div (jsd)": lambda: run(vp.vocab_parallel_kd_div(s, t, T, divergence="jsd")),
        "kd_div on the shard (jsd)": lambda: run(kdfast.kd_div(s, t, T, divergence="jsd")),
        "vocab_parallel_topk_kd_div (bucket)": lambda: run(vp.vocab_parallel_topk_kd_div(s, idx, lp, T,
                                                                                         tail="bucket")),
        "topk_kd_div on the shard (bucket)": lambda: run(kdfast.topk_kd_div(s, local_idx, lp, T, tail="bucket")),
        "vocab_parallel_sampled_kd_div": lambda: run(vp.vocab_parallel_sampled_kd_div(s, sampled, T)),
        "sampled_kd_div on the shard": lambda: run(kdfast.sampled_kd_div(s, local_sampled, T)),
    }


def _worker(rank, port, args, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    try:
        steps = _steps(rank, args.rows, args.shard)
        names = [n for n in steps if args.only is None or args.only in n]
        times = {n: [] for n in names}
        peaks = {n: 0 for n in names}
        for n in names:  # warm-up
            steps[n]()
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):  # interleaved, alternating order
                dist.barrier()
                peaks[n] = max(peaks[n], _extra_peak(steps[n]))
                dist.barrier()
                start = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - start)
        with open(f"{path}.{rank}", "w") as f:
            json.dump({"times": times, "peaks": peaks}, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--shard", type=int, default=16000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=None, help="run the rows whose name contains this")
    parser.add_argument("--out", default=None, help="write the markdown table here (default: stdout)")
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vp")
        mp.spawn(_worker, args=(port, args, path), nprocs=2)
        ranks = [json.load(open(f"{path}.{r}")) for r in range(2)]
    grad_mib = args.rows * args.shard * 4 / 2**20
    lines = [f"rows {args.rows}, shard {args.rows} x {args.shard} float32 per rank (vocabulary {2 * args.shard}), "
             f"T = {T}, forward + backward, student gradient only ({grad_mib:.1f} MiB a rank), 2 gloo ranks of one "
             f"thread each, {args.rounds} interleaved rounds, median per rank",
             "", "| row | rank 0 ms | rank 1 ms | extra peak MiB (max of ranks) | peak / gradient shard |",
             "|---|---:|---:|---:|---:|"]
    for n in ranks[0]["times"]:
        ms = [statistics.median(r["times"][n]) * 1e3 for r in ranks]
        peak = max(r["peaks"][n] for r in ranks) / 2**20
        lines.append(f"| {n} | {ms[0]:.1f} | {ms[1]:.1f} | {peak:.1f} | {peak / grad_mib:.2f}x |")
    names = list(ranks[0]["times"])
    ratios = []
    for vp_name, single in zip(names[::2], names[1::2]):
        # Per rank: the median over rounds of the round's ratio (the two rows ran back to back, so load that
        # drifts over the run cancels), and the ratio of the fastest times.
        paired = [statistics.median(a / b for a, b in zip(r["times"][vp_name], r["times"][single])) for r in ranks]
        fastest = [min(r["times"][vp_name]) / min(r["times"][single]) for r in ranks]
        ratios.append(f"- {vp_name} / {single}: paired per round {paired[0]:.2f}x (rank 0), {paired[1]:.2f}x "
                      f"(rank 1); fastest times {fastest[0]:.2f}x, {fastest[1]:.2f}x")
    text = "\n".join(lines + [""] + ratios) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
