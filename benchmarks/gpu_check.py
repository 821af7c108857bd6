"""The GPU check, sized for a lent GPU machine's budget (docs/gpu-check.md has the exact device calls):

    python3 benchmarks/gpu_check.py call1 --out DIR   # build for sm_90 (all cores), every op against the CPU kernels
                                                      # and the float64 reference on the GPU, the CUDA tests
    python3 benchmarks/gpu_check.py call2 --out DIR   # (reuse the build,) compute-sanitizer memcheck + racecheck on
                                                      # the curated cases, the headline GPU benchmarks
    python3 benchmarks/gpu_check.py all --out DIR     # both in one process, as far as --deadline allows
    python3 benchmarks/gpu_check.py all --dry-run --out DIR   # every step on the CPU, tiny sizes, no CUDA
    python3 benchmarks/gpu_check.py report DIR [DIR ...]      # here: merge the calls' results into
                                                              # benchmarks/results/<name>.json and .md

Every step runs in its own process group under its own timeout, cut to what is left of --deadline, and a step that
fails does not stop the others (only those that need its result). What a step measures is written to DIR as soon
as it exists: DIR/<name>.json and DIR/<name>.md are rewritten after every step and every measured row, DIR/log.txt
holds each step's output (capped per step), and call 1 leaves the built extension and its source stamp there for
carrying into a later call. At most 5 files: within the device's limit of 8 files back, none in a sub-folder.
Exit status 0 only when every step that ran passed.
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gpu_report import ROW, markdown  # noqa: E402

PY = sys.executable
STAMP = os.path.join(ROOT, "build", "gpu_check.stamp")
EXT = "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
LOG_CAP = 3 << 20  # bytes of one step's output kept in log.txt (then only its last lines)
CALLS = {
    "call1": ["env", "build", "ops", "cuda_tests"],
    "call2": ["env", "build", "memcheck", "racecheck", "bench"],
    "all": ["env", "build", "ops", "memcheck", "racecheck", "bench", "cuda_tests"],
}
# Each step's own limit in seconds on the GPU (what is left of --deadline cuts it further).
TIMEOUT = {"env": 30, "build": 210, "ops": 60, "cuda_tests": 150, "memcheck": 60, "racecheck": 60, "bench": 540}
NEEDS_BUILD = {"ops", "cuda_tests", "memcheck", "racecheck", "bench"}


def detect_runtime(release: str, version: str, dmesg: str) -> str:
    """The sandbox the machine runs in: "gvisor" (compute-sanitizer and ncu cannot reach the GPU there),
    "firecracker" (they can), or "unknown" (try them and read what they say)."""
    text = f"{version}\n{dmesg}".lower()
    if "gvisor" in text or "runsc" in text or release.strip() == "4.4.0":
        return "gvisor"
    if "-fc-" in release or "firecracker" in text:
        return "firecracker"
    return "unknown"


def sources_hash(parts=("csrc", "kdfast", "benchmarks", "tests"), extra=("setup.py", "CMakeLists.txt")) -> str:
    """SHA-256 over the sources that decide what runs (paths and contents), to name exactly what a result is of."""
    h = hashlib.sha256()
    files = [f for p in parts for f in glob.glob(os.path.join(ROOT, p, "**", "*"), recursive=True)]
    files += [os.path.join(ROOT, e) for e in extra]
    for f in sorted(files):
        if os.path.isfile(f) and re.search(r"\.(py|cpp|h|cu|cuh|txt)$", f) and "__pycache__" not in f:
            h.update(os.path.relpath(f, ROOT).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read() + b"\0")
    return h.hexdigest()


class Check:
    def __init__(self, out: str, name: str, call: str, dry: bool, deadline: float, rows: str = ""):
        self.out, self.name, self.dry, self.rows = out, name, dry, rows
        self.stop = time.monotonic() + deadline
        self.log = open(os.path.join(out, "log.txt"), "a", buffering=1)
        self.results = {"name": name, "call": call, "dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                        time.gmtime()), "steps": [], "ops": [], "bench": [], "sanitizer": {}}
        self.write()

    def write(self) -> None:
        """Rewrites DIR/<name>.json and .md (through a temporary name, so a cut call leaves whole files)."""
        for ext, text in (("json", json.dumps(self.results, indent=1)), ("md", markdown([self.results]))):
            path = os.path.join(self.out, f"{self.name}.{ext}")
            with open(path + ".tmp", "w") as fh:
                fh.write(text)
            os.replace(path + ".tmp", path)

    def left(self) -> float:
        return self.stop - time.monotonic()

    def run(self, cmd: list, timeout: float, env=None, on_row=None) -> tuple:
        """Runs cmd in its own process group, its output into log.txt (capped), `@@ROW {json}` lines to on_row;
        kills the group at the timeout. Returns (exit status or None when killed, its last lines)."""
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True, env={**os.environ, **(env or {})})
        killed = threading.Event()

        def kill():
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(timeout, 1), kill)
        timer.start()
        tail, written = collections.deque(maxlen=40), 0
        try:
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if written < LOG_CAP:
                    self.log.write(line)
                    written += len(line)
                if on_row is not None and line.startswith(ROW):
                    try:
                        row = json.loads(line[len(ROW):])
                    except ValueError:  # a row garbled by other output: it stays in the log only
                        continue
                    on_row(row)
        finally:
            if proc.poll() is None and not killed.is_set():  # only if this loop itself broke
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timer.cancel()
        if written >= LOG_CAP:
            self.log.write("[... output cut; its last lines:]\n" + "\n".join(tail) + "\n")
        if killed.is_set():
            self.log.write(f"[killed after {timeout:.0f} s]\n")
        return (None if killed.is_set() else proc.returncode), "\n".join(tail)

    def step(self, name: str, fn, blocked: str | None) -> str:
        t0 = time.monotonic()
        timeout = min(TIMEOUT[name], self.left() - 5)
        entry = {"name": name}
        if timeout < 10:
            entry.update(status="not-run", detail="no time left in this call")
        elif blocked:
            entry.update(status="skipped", detail=blocked)
        else:
            print(f"== {name} (up to {timeout:.0f} s)", flush=True)
            self.log.write(f"\n===== step {name} =====\n")
            try:
                entry.update(fn(timeout))
            except Exception as exc:  # the check's own bug: recorded, the other steps still run
                entry.update(status="failed", detail=f"{type(exc).__name__}: {exc}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.results["steps"].append(entry)
        self.write()
        print(f"   {name}: {entry['status']} ({entry['seconds']} s) {entry.get('detail', '')}"[:400], flush=True)
        return entry["status"]

    # ---- the steps: each returns {"status": ok | failed | timeout | cannot-run | skipped, "detail": ...} ----

    def env(self, timeout):
        probe = ("import json, torch, kdfast\n"
                 "p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None\n"
                 "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': p and p.name,"
                 "'capability': p and f'sm_{p.major}{p.minor}', 'sms': p and p.multi_processor_count,"
                 "'memory_gib': p and round(p.total_memory / 2**30, 1), 'backends': kdfast.backends()}))")
        rc, tail = self.run([PY, "-c", probe], timeout)
        info = json.loads(tail.splitlines()[-1]) if rc == 0 else {"probe_error": tail[-500:]}

        def read(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                return ""

        version = open("/proc/version").read().strip() if os.path.exists("/proc/version") else ""
        # Seconds since the machine booted when this call's first step began: part of what a call costs.
        info["uptime_s"] = float(open("/proc/uptime").read().split()[0]) if os.path.exists("/proc/uptime") else None
        release = os.uname().release
        info.update(nvidia_smi=read(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"]) or "absent", kernel=release, proc_version=version,
                    runtime=detect_runtime(release, version, read(["dmesg"])[:20000]), cores=os.cpu_count(),
                    python=sys.version.split()[0], sanitizer=shutil.which("compute-sanitizer") or "absent",
                    commit=read(["git", "-C", ROOT, "rev-parse", "HEAD"]) or "unknown (no .git here)",
                    sources_sha256=sources_hash())
        info["device_line"] = (f"{info['nvidia_smi']}; torch {info.get('torch')} (CUDA {info.get('cuda')}), "
                               f"{info.get('capability')}, {info.get('sms')} SMs; runtime {info['runtime']} "
                               f"(kernel {release}); {info['cores']} cores")
        self.results["env"] = info
        return {"status": "ok" if rc == 0 else "failed", "detail": info["device_line"]}

    def _backends(self, timeout) -> dict:
        rc, tail = self.run([PY, "-c", "import json, kdfast; print(json.dumps(kdfast.backends()))"], timeout)
        return json.loads(tail.splitlines()[-1]) if rc == 0 else {"error": tail[-500:]}

    def build(self, timeout):
        if self.dry:  # compiling takes minutes on a small machine: the dry run checks the extension in place loads
            b = self.results.get("env", {}).get("backends") or self._backends(timeout)
            ok = b.get("extension")
            return {"status": "ok" if ok else "failed", "detail": f"dry run, no compile; extension loads: {bool(ok)}"}
        import torch

        stamp = hashlib.sha256(f"{sources_hash(('csrc',), ('setup.py',))} torch {torch.__version__} sm_90".encode())
        stamp = stamp.hexdigest()
        if os.path.exists(STAMP) and open(STAMP).read().strip() == stamp and self._backends(30).get("cuda"):
            return {"status": "ok", "detail": f"reused the build of these sources ({stamp[:12]})"}
        env = {"KDFAST_CUDA": "1", "KDFAST_CUDA_ARCHS": "90", "MAX_JOBS": str(os.cpu_count())}
        rc, tail = self.run([PY, "setup.py", "build_ext", "--inplace"], timeout - 15, env)
        if rc != 0:
            return {"status": "timeout" if rc is None else "failed", "detail": "BUILD FAILED: " + tail[-1500:]}
        b = self._backends(15)
        if not b.get("cuda"):  # fail loudly: a CPU-only build would make every CUDA step meaningless
            return {"status": "failed", "detail": f"BUILD HAS NO CUDA KERNELS (fell back to CPU only): {b}"}
        os.makedirs(os.path.dirname(STAMP), exist_ok=True)
        with open(STAMP, "w") as fh:
            fh.write(stamp + "\n")
        ext = os.path.join(ROOT, "kdfast", EXT)
        carried = os.path.getsize(ext) <= 16 << 20
        if carried:  # for a later call on a fresh machine (docs/gpu-check.md: carry)
            shutil.copy(ext, self.out)
            shutil.copy(STAMP, self.out)
        return {"status": "ok", "detail": f"built for sm_90 ({stamp[:12]}); {EXT} {os.path.getsize(ext) >> 20} MiB"
                + (", copied to the results for carrying" if carried else ", too large to bring back")}

    def ops(self, timeout):
        def on_row(row):
            self.results["ops"].append(row)
            self.write()

        cmd = [PY, "benchmarks/gpu_cases.py", "check", "--device", "cpu" if self.dry else "cuda"]
        rc, tail = self.run(cmd + (["--quick"] if self.dry else []), timeout, on_row=on_row)
        bad = [f"{r['case']} {r['dtype']}: {r['status']}" for r in self.results["ops"] if r["status"] in
               ("failed", "error")]
        counts = collections.Counter(r["status"] for r in self.results["ops"])
        status = "timeout" if rc is None else "ok" if rc == 0 and not bad else "failed"
        return {"status": status, "detail": f"{dict(counts)}" + (f"; {bad[:10]}" if bad else "")}

    def cuda_tests(self, timeout):
        # The dry run collects one test file: the whole suite's collection takes long on a small machine.
        cmd = [PY, "-m", "pytest", "tests/test_logits.py" if self.dry else "tests", "-k", "cuda", "-q", "-p",
               "no:cacheprovider", "-rfE", "--maxfail=30"]
        if not self.dry and subprocess.run([PY, "-c", "import xdist"], capture_output=True).returncode == 0:
            cmd += ["-n", "8"]
        rc, tail = self.run(cmd, timeout)
        summary = next((line for line in reversed(tail.splitlines()) if re.search(r"\b(passed|failed|skipped|"
                                                                                 r"deselected|error)", line)), "")
        failures = [line for line in tail.splitlines() if line.startswith(("FAILED", "ERROR"))]
        self.results["tests"] = {"summary": summary.strip("= "), "failures": failures, "exit": rc}
        return {"status": "timeout" if rc is None else "ok" if rc == 0 else "failed", "detail": summary.strip("= ")}

    def _sanitize(self, tool: str, timeout):
        cases = [PY, "benchmarks/gpu_cases.py", "run", "--device"]
        if self.dry:  # one case: the ops step ran them all already
            rc, tail = self.run(cases + ["cpu", "--quick", "-k", "kd_loss"], timeout)
            result = {"status": "ok" if rc == 0 else "failed", "detail": "dry run: a curated case without "
                      "compute-sanitizer"}
        elif self.results.get("env", {}).get("runtime") == "gvisor":
            result = {"status": "cannot-run", "detail": "gVisor runtime: compute-sanitizer cannot reach the GPU "
                      "there (Device not supported); nothing was checked"}
        elif not shutil.which("compute-sanitizer"):
            result = {"status": "cannot-run", "detail": "compute-sanitizer is not on this machine"}
        else:
            # Only kdfast's kernels are instrumented; API errors are not findings (torch probes the driver with
            # calls that fail by design, and kdfast's bindings raise on their own launch errors).
            cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", "--kernel-name", "kns=kdfast",
                   "--report-api-errors", "no", "--print-limit", "20"] + cases + ["cuda"]
            # No caching allocator: an access past a tensor's end then lands outside any allocation and is seen.
            rc, tail = self.run(cmd, timeout, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
            found = re.findall(r"(?:ERROR SUMMARY: (\d+) error|\((\d+) errors?, (\d+) warnings?\))", tail)
            findings = max((int(a or b or 0) for a, b, _ in found), default=0)
            refused = re.search(r".*(Device not supported|not supported on this|Error 999|unable to).*", tail, re.I)
            if refused and rc != 0 and not found:
                result = {"status": "cannot-run", "detail": f"compute-sanitizer could not run: {refused.group(0)}"}
            else:
                status = "timeout" if rc is None else "ok" if rc == 0 and findings == 0 else "failed"
                summary = [ln.strip("= ") for ln in tail.splitlines() if "SUMMARY" in ln]
                result = {"status": status, "detail": f"{findings} findings; {summary}", "findings": findings}
        self.results["sanitizer"][tool] = result
        return result

    def memcheck(self, timeout):
        return self._sanitize("memcheck", timeout)

    def racecheck(self, timeout):
        return self._sanitize("racecheck", timeout)

    def bench(self, timeout):
        t0, env = time.monotonic(), {}
        wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
        if wheels and not self.dry:  # the peers carried as wheels (Liger-Kernel); the machine has no registry
            site = "/tmp/kdfast-peers"
            self.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
                      *wheels], 60)
            env["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")

        def on_row(row):
            self.results["bench"].append(row)
            self.write()

        timeout -= time.monotonic() - t0
        cmd = [PY, "benchmarks/gpu_bench.py", "--device", "cpu" if self.dry else "cuda",
               "--deadline", str(max(timeout - 30, 5)), "-k", self.rows]
        rc, tail = self.run(cmd + (["--dry-run"] if self.dry else []), timeout, env, on_row)
        counts = collections.Counter(r["status"] for r in self.results["bench"])
        return {"status": "timeout" if rc is None else "ok" if rc == 0 else "failed", "detail": f"{dict(counts)}"}


def check(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    name = args.name or ("cpu-dry-run" if args.dry_run else "h200")
    c = Check(args.out, name, args.call, args.dry_run, args.deadline, args.rows)
    steps = args.steps.split(",") if args.steps else CALLS[args.call]
    status = {}
    for step in steps:
        built = status.get("build", "ok")
        blocked = f"needs the build, which ended {built}" if step in NEEDS_BUILD and built != "ok" else None
        status[step] = c.step(step, getattr(c, step), blocked)
    print("\n" + markdown([c.results], brief=True), flush=True)
    bad = [s for s, v in status.items() if v not in ("ok", "cannot-run")]
    print(f"GPU check {args.call}: " + ("all steps passed" if not bad else f"NOT PASSED: {', '.join(bad)}"))
    return 1 if bad else 0


def report(args) -> int:
    """Merges the results of the calls (directories or JSON files) into benchmarks/results/<name>.json and .md."""
    calls = []
    for path in args.paths:
        path = os.path.join(path, f"{args.name}.json") if os.path.isdir(path) else path
        with open(path) as fh:
            calls.append(json.load(fh))
    local = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    here = sources_hash()
    for c in calls:  # name the commit that ran, where the device had no .git
        ran = c.get("env", {}).get("sources_sha256")
        if c.get("env", {}).get("commit", "unknown").startswith("unknown"):
            c.setdefault("env", {})["commit"] = local if ran == here else f"unknown (sources differ from {local})"
    merged = {"name": args.name, "commit": local, "notes": args.note, "calls": calls}
    os.makedirs(args.results_dir, exist_ok=True)
    base = os.path.join(args.results_dir, args.name)
    with open(base + ".json", "w") as fh:
        json.dump(merged, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(calls) + ("\n## Notes\n\n" + "".join(f"- {n}\n" for n in args.note) if args.note else ""))
    print(f"wrote {base}.json and {base}.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="call", required=True)
    for call in CALLS:
        p = sub.add_parser(call)
        p.add_argument("--out", required=True, help="the results folder ($OUT on the device)")
        p.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny sizes, no CUDA")
        p.add_argument("--deadline", type=float, default=255 if call != "all" else 570,
                       help="seconds this call may take in all (the device call's timeout_s less a margin)")
        p.add_argument("--steps", default="", help="comma-separated steps instead of the call's own")
        p.add_argument("--name", default="", help="results name (default h200, cpu-dry-run in a dry run)")
        p.add_argument("--rows", default="", help="only the benchmark rows whose id contains this")
    p = sub.add_parser("report")
    p.add_argument("paths", nargs="+", help="the calls' results folders or <name>.json files")
    p.add_argument("--name", default="h200")
    p.add_argument("--note", action="append", default=[], help="a line for the report (e.g. each call's lease)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    return report(args) if args.call == "report" else check(args)


if __name__ == "__main__":
    sys.exit(main())
