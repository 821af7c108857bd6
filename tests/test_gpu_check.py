"""The GPU check (benchmarks/gpu_check.py) while no GPU is lent: its dry run goes through every step on the CPU, so
the script cannot rot; the step machinery (timeouts, failures, the device's file limits), the runtime detection,
the op comparison and the report are checked directly. (No test name here may contain the device word the check's
own test step selects with -k: the dry run runs pytest.)"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_bench  # noqa: E402
import gpu_cases  # noqa: E402
import gpu_check  # noqa: E402
import gpu_report  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "all", "--dry-run",
                           "--out", str(out), "--deadline", "900"], capture_output=True, text=True, timeout=900)
    with open(out / "cpu-dry-run.json") as fh:
        return proc, json.load(fh), out


def test_dry_run_passes_every_step(dry_run):
    proc, results, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s["name"] for s in results["steps"]] == gpu_check.CALLS["all"]
    assert all(s["status"] == "ok" for s in results["steps"]), results["steps"]
    assert "all steps passed" in proc.stdout


def test_dry_run_checks_every_op_and_measures_every_row(dry_run):
    _, results, _ = dry_run
    checked = {r["case"] for r in results["ops"] if r["status"] == "ok"}
    absent = {r["case"] for r in results["ops"] if r["status"] == "absent"}
    assert checked | absent == {c.name for c in gpu_cases.CASES}
    assert all(c.startswith(("topk_kd_div", "fused_linear_kd")) for c in absent)  # only the LLM ops may be missing
    bench = results["bench"]
    assert bench[0]["op"] == "copy" and bench[0]["gbs"] > 0
    measured = {(r["op"], r["dtype"], r["impl"]): r["status"] for r in bench[1:]}
    for op, dtype in {(r.op, str(r.dtype)[6:]) for r in gpu_bench.ROWS}:  # the dry run: one row of each
        got = {impl: status for (o, d, impl), status in measured.items() if (o, d) == (op, dtype)}
        assert got == {"kdfast": "absent"} or (got.keys() >= {"kdfast", "compiled"} and
                                               set(got.values()) == {"ok"}), (op, dtype, got)


def test_dry_run_results_fit_the_device_limits(dry_run):
    _, results, out = dry_run
    names = os.listdir(out)
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all(os.path.isfile(out / n) and os.path.getsize(out / n) < 16 << 20 for n in names)
    md = (out / "cpu-dry-run.md").read_text()
    assert "| bench | ok |" in md and "### Benchmarks" in md and "### Every op on the device" in md
    assert re.fullmatch(r"[0-9a-f]{64}", results["env"]["sources_sha256"])


def test_a_step_past_its_timeout_is_killed_and_reported(tmp_path):
    c = gpu_check.Check(str(tmp_path), "t", "all", True, 60)
    t0 = time.monotonic()
    rc, tail = c.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    assert rc is None and "started" in tail and time.monotonic() - t0 < 30
    assert "[killed after 2 s]" in (tmp_path / "log.txt").read_text()


def test_a_failed_build_skips_what_needs_it_and_fails_the_call(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.Check, "build", lambda self, timeout: {"status": "failed", "detail": "BUILD FAILED"})
    monkeypatch.setattr(gpu_check.Check, "env", lambda self, timeout: {"status": "ok"})
    assert gpu_check.main(["call1", "--dry-run", "--out", str(tmp_path), "--name", "t"]) == 1
    steps = json.loads((tmp_path / "t.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("env", "ok"), ("build", "failed"), ("ops", "skipped"),
                                                         ("cuda_tests", "skipped")]


def test_a_step_that_raises_is_a_failed_step(tmp_path, monkeypatch):
    def broken(self, timeout):
        raise KeyError("x")

    monkeypatch.setattr(gpu_check.Check, "env", broken)
    assert gpu_check.main(["call1", "--dry-run", "--out", str(tmp_path), "--name", "t", "--steps", "env"]) == 1
    assert json.loads((tmp_path / "t.json").read_text())["steps"][0]["status"] == "failed"


def test_no_step_starts_without_time_left(tmp_path):
    assert gpu_check.main(["call2", "--dry-run", "--out", str(tmp_path), "--name", "t", "--deadline", "8"]) == 1
    steps = json.loads((tmp_path / "t.json").read_text())["steps"]
    assert {s["status"] for s in steps} == {"not-run"}


@pytest.mark.parametrize("release, version, dmesg, runtime", [
    ("4.4.0", "Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016", "", "gvisor"),
    ("5.15.0", "", "[    0.000000] Starting gVisor...", "gvisor"),
    ("6.18.44-fc-v236-gpu", "Linux version 6.18.44-fc-v236-gpu", "", "firecracker"),
    ("6.8.0-45-generic", "Linux version 6.8.0-45-generic", "", "unknown"),
])
def test_detect_runtime(release, version, dmesg, runtime):
    assert gpu_check.detect_runtime(release, version, dmesg) == runtime


def test_sanitizer_is_not_run_on_gvisor_and_says_so(tmp_path):
    c = gpu_check.Check(str(tmp_path), "t", "call2", False, 60)
    c.results["env"] = {"runtime": "gvisor"}
    result = c.memcheck(30)
    assert result["status"] == "cannot-run" and "gVisor" in result["detail"]
    assert c.results["sanitizer"]["memcheck"] == result


def test_a_wrong_kernel_fails_its_case():
    case = gpu_cases.CASES[0]
    wrong = gpu_cases.Case("wrong", (torch.float32,), case.inputs, case.grads, lambda *x: case.kdfast(*x) * 1.01,
                           case.reference)
    nan = gpu_cases.Case("nan", (torch.float32,), case.inputs, case.grads, lambda *x: case.kdfast(*x) * math_nan(),
                         case.reference)
    assert gpu_cases.check_case(case, torch.float32, "cpu", 0)["status"] == "ok"
    assert gpu_cases.check_case(wrong, torch.float32, "cpu", 0)["status"] == "failed"
    assert gpu_cases.check_case(nan, torch.float32, "cpu", 0)["vs_reference"] == float("inf")


def math_nan():
    return float("nan")


def _call(call, bench, sanitizer=None):
    return {"name": "h200", "call": call, "dry_run": False, "started": "now", "steps": [], "ops": [],
            "bench": bench, "sanitizer": sanitizer or {}, "env": {"commit": "unknown (no .git here)"}}


def _row(row, impl, ms, **extra):
    return {"row": row, "op": row.split("/")[0], "impl": impl, "status": "ok", "median_ms": ms, **extra}


def test_targets_and_report(tmp_path):
    llm = "kd_div/llm-8k/float32"
    bench = [{"op": "copy", "impl": "torch", "status": "ok", "gbs": 4000.0, "median_ms": 1.0},
             _row(llm, "kdfast", 1.0, gbs=3600.0, bytes=3.6e9), _row(llm, "compiled", 2.5, gbs=1440.0, bytes=3.6e9),
             _row("batched_svd/svd32/float32", "kdfast", 1.0), _row("batched_svd/svd32/float32", "cusolver", 3.0)]
    verdicts = {w: v for w, _, v in gpu_report.targets(_call("call2", bench, {"memcheck": {"status": "cannot-run"}}))}
    assert verdicts["kd_div llm fp32: >= 85% of copy bandwidth, >= 2x torch.compile"] == "met"
    assert verdicts["batched SVD 32 x 32: >= 5x cuSOLVER"] == "MISSED"
    assert verdicts["kd_div llm bf16: >= 85% of copy bandwidth, >= 2x torch.compile"] == "not measured"
    assert verdicts["memcheck: zero findings"] == "could not run"
    for i, call in enumerate(("call1", "call2")):
        os.makedirs(tmp_path / call)
        (tmp_path / call / "h200.json").write_text(json.dumps(_call(call, bench if i else [])))
    assert gpu_check.main(["report", str(tmp_path / "call1"), str(tmp_path / "call2"), "--results-dir",
                           str(tmp_path / "results"), "--note", "call1: held 400 s, ran 270 s"]) == 0
    merged = json.loads((tmp_path / "results" / "h200.json").read_text())
    assert [c["call"] for c in merged["calls"]] == ["call1", "call2"]
    assert all(c["env"]["commit"] != "unknown (no .git here)" for c in merged["calls"])
    md = (tmp_path / "results" / "h200.md").read_text()
    assert "## call1" in md and "## call2" in md and "| MISSED |" in md and "- call1: held 400 s" in md


def _fake_run(rc, output):
    return lambda self, cmd, timeout, env=None, on_row=None: (rc, output)


def test_a_build_without_gpu_kernels_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAMP", str(tmp_path / "stamp"))
    monkeypatch.setattr(gpu_check.Check, "run", _fake_run(0, "built"))
    monkeypatch.setattr(gpu_check.Check, "_backends", lambda self, timeout: {"extension": True, "cuda": False})
    result = gpu_check.Check(str(tmp_path), "t", "call1", False, 300).build(200)
    assert result["status"] == "failed" and "NO CUDA KERNELS" in result["detail"]


@pytest.mark.parametrize("rc, output, status, findings", [
    (0, "========= ERROR SUMMARY: 0 errors", "ok", 0),
    (1, "========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors", "failed", 3),
    (1, "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)", "failed", 2),
    (1, "========= Error: Device not supported\n========= Target application returned an error", "cannot-run", None),
    (None, "========= COMPUTE-SANITIZER", "timeout", 0),
])
def test_sanitizer_verdicts(tmp_path, monkeypatch, rc, output, status, findings):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/local/cuda/bin/" + name)
    monkeypatch.setattr(gpu_check.Check, "run", _fake_run(rc, output))
    c = gpu_check.Check(str(tmp_path), "t", "call2", False, 300)
    c.results["env"] = {"runtime": "firecracker"}
    result = c.racecheck(60)
    assert result["status"] == status and result.get("findings") == findings
