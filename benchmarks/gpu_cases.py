"""The GPU check's curated cases: one small forward + backward per kdfast op, on odd sizes, with masks, ignored
targets and padding, shared by the check's two uses of them:

    python3 benchmarks/gpu_cases.py check --device cuda   # each case on the device against the CPU kernels and the
                                                           # float64 reference (run on the same device)
    python3 benchmarks/gpu_cases.py run --device cuda     # forward + backward on the device only: what
                                                           # compute-sanitizer watches (memcheck, racecheck)

Each case and dtype prints one line `@@ROW {json}` (benchmarks/gpu_check.py collects them as they come). The LLM ops
(topk_kd_div, fused_linear_kd) join when kdfast has them: a case whose function is missing gives a row with status
"absent", not a failure. The exit status is 1 when any case failed or raised.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from gpu_report import ROW  # noqa: E402

import kdfast  # noqa: E402
from kdfast import reference  # noqa: E402

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# ||result - expected|| / ||expected|| allowed, by input dtype (a case may scale it: ill-conditioned SVD gradients).
TOLERANCE = {F64: 1e-9, F32: 1e-4, F16: 5e-3, BF16: 2e-2}


class Absent(Exception):
    """The function a case needs is not in this kdfast (an op that has not landed yet)."""


def need(module, name: str):
    fn = getattr(module, name, None)
    if fn is None:
        raise Absent(f"{module.__name__}.{name}")
    return fn


@dataclass
class Case:
    """inputs(g, dtype) -> CPU tensors; grads: indices of the inputs to differentiate; kdfast(*inputs) and
    reference(*inputs) -> a tensor (reference given float64 copies of the floating inputs)."""
    name: str
    dtypes: tuple
    inputs: Callable
    grads: tuple
    kdfast: Callable
    reference: Callable
    tolerance_scale: float = 1.0


def _randn(g, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _mask(g, shape):
    m = torch.rand(shape, generator=g) > 0.3
    m.view(-1)[0] = True
    return m


def _target(g, rows, classes, ignored=0.25):
    y = torch.randint(0, classes, rows, generator=g)
    y[torch.rand(rows, generator=g) < ignored] = -100
    return y


def _logit_cases() -> list:
    out = []
    lowp = (F32, F64, BF16, F16)
    for div in ("kl", "reverse_kl", "jsd"):
        out.append(Case(f"kd_div[{div},37x1001,mask]", lowp,
                        lambda g, d: (_randn(g, (37, 1001), d, 3), _randn(g, (37, 1001), d, 3), _mask(g, (37,))),
                        (0, 1),
                        lambda s, t, m, div=div: kdfast.kd_div(s, t, 2.0, divergence=div, mask=m),
                        lambda s, t, m, div=div: reference.kd_div(s, t, 2.0, divergence=div, mask=m)))
    out.append(Case("kd_div[pixels,dim=1,3x19x13x17,none]", lowp,
                    lambda g, d: (_randn(g, (3, 19, 13, 17), d, 3), _randn(g, (3, 19, 13, 17), d, 3),
                                  _mask(g, (3, 13, 17))),
                    (0, 1),
                    lambda s, t, m: kdfast.kd_div(s, t, 4.0, dim=1, mask=m, reduction="none"),
                    lambda s, t, m: reference.kd_div(s, t, 4.0, dim=1, mask=m, reduction="none")))
    # Rows read through a stride (a transposed view) and a vocabulary of odd length.
    out.append(Case("kd_div[strided,5x32003,sum]", (F32, BF16),
                    lambda g, d: (_randn(g, (32003, 5), d, 3), _randn(g, (32003, 5), d, 3)),
                    (0, 1),
                    lambda s, t: kdfast.kd_div(s.T, t.T, 1.0, reduction="sum"),
                    lambda s, t: reference.kd_div(s.T, t.T, 1.0, reduction="sum")))
    out.append(Case("kd_loss[jsd,37x1001,ignored]", lowp,
                    lambda g, d: (_randn(g, (37, 1001), d, 3), _randn(g, (37, 1001), d, 3), _target(g, (37,), 1001)),
                    (0, 1),
                    lambda s, t, y: kdfast.kd_loss(s, t, y, 4.0, 0.7, divergence="jsd"),
                    lambda s, t, y: reference.kd_loss(s, t, y, 4.0, 0.7, divergence="jsd")))
    return out


def _topk_inputs(g, dtype, index_dtype):
    s = _randn(g, (37, 1001), dtype, 3)
    lp_all = torch.log_softmax(torch.randn(37, 1001, generator=g) * 3, -1)
    lp, idx = lp_all.topk(7, -1)
    lp[::4, -2:] = -math.inf  # padding: the server returned fewer entries; its index is 0, repeated
    idx[::4, -2:] = 0
    return s, idx.to(index_dtype), lp.to(dtype), _mask(g, (37,))


def _llm_cases() -> list:
    out = []
    for tail, index_dtype in (("renormalize", torch.int64), ("bucket", torch.int32)):
        out.append(Case(f"topk_kd_div[{tail},37x1001,k=7,{str(index_dtype)[6:]},padded,mask]", (F32, F64, BF16),
                        lambda g, d, i=index_dtype: _topk_inputs(g, d, i), (0,),
                        lambda s, i, lp, m, tail=tail: need(kdfast, "topk_kd_div")(s, i, lp, 2.0, tail=tail, mask=m),
                        lambda s, i, lp, m, tail=tail: need(reference, "topk_kd_div")(s, i, lp, 2.0, tail=tail,
                                                                                      mask=m)))

    def fused_inputs(g, d):
        return (_randn(g, (37, 24), d), _randn(g, (1001, 24), d, 0.3), _randn(g, (1001,), d), _randn(g, (37, 32), d),
                _randn(g, (1001, 32), d, 0.3), _target(g, (37,), 1001))

    def fused(h, w, b, ht, wt, y, teacher):
        return need(kdfast, "fused_linear_kd")(h, w, teacher(ht, wt), student_bias=b, target=y, temperature=2.0,
                                               alpha=0.5, divergence="jsd")

    def composed(h, w, b, ht, wt, y):  # the float64 composition the fused op must equal
        return reference.kd_loss(h @ w.T + b, ht @ wt.T, y, 2.0, 0.5, divergence="jsd")

    out.append(Case("fused_linear_kd[TeacherHead,37x24->1001,bias,ignored]", (F32, F64, BF16), fused_inputs,
                    (0, 1, 2),
                    lambda *x: fused(*x, lambda ht, wt: need(kdfast, "TeacherHead")(ht, wt)), composed))
    out.append(Case("fused_linear_kd[dense,37x24->1001,bias,ignored]", (F32, F64, BF16), fused_inputs, (0, 1, 2),
                    lambda *x: fused(*x, lambda ht, wt: ht @ wt.T), composed))
    return out


def _svd_gauge_free(svd):
    """A loss of U, S, Vh that does not depend on their columns' signs (so the kernel and cuSOLVER agree)."""
    def loss(a):
        U, S, Vh = svd(a)
        w = [torch.arange(x.numel(), device=x.device, dtype=x.dtype).reshape(x.shape) % 7 / 7 for x in (U, S, Vh)]
        return (U * U * w[0]).sum() + (S * w[1]).sum() + (Vh * Vh * w[2]).sum()
    return loss


def _feature_cases() -> list:
    hi = (F32, F64)
    out = [
        Case("attention_map[max,3x5x7x9]", (F32, F64, BF16), lambda g, d: (_randn(g, (3, 5, 7, 9), d),), (0,),
             lambda x: kdfast.attention_map(x, pool="max"), lambda x: reference.attention_map(x, pool="max")),
        Case("attention_transfer_loss[2 pairs,pooled,p=3]", (F32, F64, BF16),
             lambda g, d: (_randn(g, (3, 5, 7, 9), d), _randn(g, (3, 4, 4, 5), d), _randn(g, (3, 6, 7, 9), d),
                           _randn(g, (3, 8, 2, 3), d)),
             (0, 1, 2, 3),
             lambda a, b, c, e: kdfast.attention_transfer_loss([a, b], [c, e], 3.0),
             lambda a, b, c, e: reference.attention_transfer_loss([a, b], [c, e], 3.0)),
        Case("pairwise_affinity_loss[2x5 vs 2x7,9x11]", hi,
             lambda g, d: (_randn(g, (2, 5, 9, 11), d), _randn(g, (2, 7, 9, 11), d)), (0, 1),
             kdfast.pairwise_affinity_loss, reference.pairwise_affinity_loss),
        Case("pairwise_affinity_loss[pool 2 avg]", hi,
             lambda g, d: (_randn(g, (2, 5, 9, 11), d), _randn(g, (2, 7, 9, 11), d)), (0, 1),
             lambda s, t: kdfast.pairwise_affinity_loss(s, t, pool_size=2, pool="avg"),
             lambda s, t: reference.pairwise_affinity_loss(s, t, pool_size=2, pool="avg")),
        Case("similarity_preserving_loss[9x3x5x5 vs 9x6x5x5]", hi,
             lambda g, d: (_randn(g, (9, 3, 5, 5), d), _randn(g, (9, 6, 5, 5), d)), (0, 1),
             kdfast.similarity_preserving_loss, reference.similarity_preserving_loss),
        Case("batched_svd[7x13x5]", hi, lambda g, d: (_randn(g, (7, 13, 5), d),), (0,),
             _svd_gauge_free(kdfast.batched_svd), _svd_gauge_free(reference.batched_svd), 10.0),
        Case("batched_svd[3x33x33]", hi, lambda g, d: (_randn(g, (3, 33, 33), d),), (0,),
             _svd_gauge_free(kdfast.batched_svd), _svd_gauge_free(reference.batched_svd), 10.0),
        Case("manifold_distillation_loss[2x6 vs 2x8,5x7,rank 3]", hi,
             lambda g, d: (_randn(g, (2, 6, 5, 7), d), _randn(g, (2, 8, 5, 7), d)), (0, 1),
             lambda s, t: kdfast.manifold_distillation_loss(s, t, 3),
             lambda s, t: reference.manifold_distillation_loss(s, t, 3), 10.0),
    ]
    return out


CASES = _logit_cases() + _llm_cases() + _feature_cases()


def evaluate(fn, inputs, grads, device, dtype=None):
    """fn's output and the gradients of its sum, as float64 CPU tensors; floating inputs cast to dtype if given."""
    xs = [x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)
          for x in inputs]
    for i in grads:
        xs[i].requires_grad_(True)
    out = fn(*xs)
    got = torch.autograd.grad(out.sum(), [xs[i] for i in grads])
    return [t.detach().to("cpu", torch.float64) for t in (out, *got)]


def relative_error(actual, expected) -> float:
    """The largest ||a - e|| / ||e|| over the outputs; inf where either holds a NaN the other does not."""
    worst = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape or not torch.equal(a.isnan(), e.isnan()):
            return math.inf
        a, e = a.nan_to_num(), e.nan_to_num()
        worst = max(worst, ((a - e).norm() / e.norm().clamp_min(1e-30)).item())
    return worst


def check_case(case: Case, dtype, device: str, seed: int) -> dict:
    """The case on `device` against the CPU kernels (when device is not the CPU) and the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    inputs = case.inputs(g, dtype)
    tol = TOLERANCE[dtype] * case.tolerance_scale
    got = evaluate(case.kdfast, inputs, case.grads, device)
    row = {"tolerance": tol}
    if device != "cpu":
        row["vs_cpu"] = relative_error(got, evaluate(case.kdfast, inputs, case.grads, "cpu"))
    row["vs_reference"] = relative_error(got, evaluate(case.reference, inputs, case.grads, device, F64))
    row["status"] = "ok" if all(v <= tol for k, v in row.items() if k.startswith("vs_")) else "failed"
    return row


def run_case(case: Case, dtype, device: str, seed: int) -> dict:
    """Forward + backward on the device only (the sanitizer's workload)."""
    g = torch.Generator().manual_seed(seed)
    evaluate(case.kdfast, case.inputs(g, dtype), case.grads, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"status": "ok"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["check", "run"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("--quick", action="store_true", help="each case in its first dtype only (the dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not kdfast.backends()["cuda"]:
        print("kdfast has no CUDA kernels in this build", file=sys.stderr)
        return 1
    failed = 0
    for n, case in enumerate(c for c in CASES if args.k in c.name):
        for dtype in case.dtypes[:1] if args.quick else case.dtypes:
            row = {"case": case.name, "dtype": str(dtype)[6:], "device": args.device}
            try:
                row.update((check_case if args.mode == "check" else run_case)(case, dtype, args.device, n))
            except Absent as exc:
                row.update(status="absent", detail=f"{exc} is not in this kdfast")
            except Exception as exc:  # a raising case is a finding: recorded with the others, the rest still run
                row.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:500])
            failed += row["status"] in ("failed", "error")
            print(ROW + json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
