"""`omniq quantize` at the real width: memory, time per stage and rates against this machine's own limits.

    python scripts/make_realwidth.py /work/scratch/rw5 --pattern 'MEM*E'
    python scripts/make_realwidth.py /work/scratch/rw12 --pattern 'MEM*EMEM*EME'
    python benchmarks/quantize_scale.py rw5=/work/scratch/rw5 rw12=/work/scratch/rw12 \
        [--recipes fp8,omni-nvfp4] [--samples 16 --seq-len 128] [--cgroup-gib 6] [--plain rw5] [--work DIR]

For each checkpoint and recipe, one `omniq quantize` in its own process (its `wall_s` also holds the two
matmul measurements, about 30 s; the quantize's own time is `seconds.total`) (`--cgroup-gib`: inside a cgroup-v1
child group of this process's own memory cgroup with that `memory.limit_in_bytes`; the run must pass there,
which proves the ceiling rather than measuring it): peak RSS (wait4 of that child; it counts the source
shards' mmapped page-cache pages too) and peak anonymous RSS (sampled), the cgroup's max_usage_in_bytes
(anonymous memory plus the page cache charged to it: it reaches the limit whenever more than the limit is
read, and the kernel reclaims cache there), the time of each stage (QuantizeResult.seconds), bytes read from the source and written,
their rates, the preflight's predicted peak (`omniq.quant.memory.streamed_estimate`) beside the measured one,
and calibration's achieved matmul rate beside this machine's own.

Calibration's rate: the matmul FLOPs of the calibration forward counted from the architecture (2 x in x out
per token and linear, routed experts top-k per token, plus the tokens the expert-coverage hooks forced through
under-routed experts, from the artifact's manifest) over the seconds spent in `streamed.calibrate_layer`
(ModelOpt's max calibration of a layer over every row; reading the layer from the shards, `materialize`, is
timed apart), by wall clock and by the child's CPU time (`StageClock` wraps both functions in the child).
The machine's rate (`matmul_rates`): `F.linear` at the shapes calibration runs (a routed expert's 24-token
projections per batch, 96 tokens, the 512-token dense linears), bf16 and fp32, best of 5 windows, measured
inside the same child process with the same torch thread count (`--threads`, default 1, also
OMP_NUM_THREADS), right before and right after its quantize, by wall clock and by CPU time. The goal of
issue 12 (calibration at least 0.3 x the machine's matmul rate) is judged against the best bf16 rate of any
size, before or after (`machine_peak`; calibration computes in bf16): the strictest reading; CPU time makes
both sides independent of what other processes take of the cores (wall-clock figures are recorded too).
Before each run the benchmark waits (up to 10 min) for the 1-minute load average to drop to `--max-load`.
`--plain NAME` also runs a plain
ModelOpt script (from_pretrained, mtq.quantize, export_hf_checkpoint: benchmarks/quantize_bench.py's) on that
checkpoint, outside the cgroup, with the whole-model estimate (`omniq.quant.memory.estimate`) beside it.
The disk's sequential write speed is measured in the same run (1 GiB written + fsync in --work), at the start,
before every run and at the end: single samples varied 2-4x (320-1480 MB/s) on this shared machine, so
`disk_write_bytes_per_s` is their median, each run records the sample taken right before it, and the export's
ratio is given against both (`write_vs_disk_median`, `write_vs_disk_before`). `--repeat N` runs each
checkpoint and recipe N times; `--baseline DIR` runs another checkout's omniq (e.g. `git archive` of an
earlier commit) before each run, interleaved, as tool `omniq-baseline`.

Prints a table and writes benchmarks/results/quantize_scale.json (runs of earlier invocations with other
checkpoints or recipes are kept; the machine figures are this invocation's). Timing on a shared 2-core machine is noisy
(the load average is recorded with each run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "quantize_scale.json"

CHILD = r"""
import json, sys, time, torch
from benchmarks.quantize_scale import StageClock, matmul_rates
from omniq.commands.quantize import quantize
src, out, recipe, samples, seq_len, dest, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
before = matmul_rates()
clock = StageClock()
t = time.perf_counter()
with clock.installed():
    r = quantize(src, recipe, out, calib="tiny-calib", calib_samples=int(samples), calib_seq_len=int(seq_len))
wall = time.perf_counter() - t
after = matmul_rates()
experts = r.manifest.get("experts", {}).get("layers", {})
json.dump({"seconds": r.seconds, "bytes_read": r.bytes_read, "output_bytes": r.output_bytes,
           "predicted_peak_bytes": r.predicted_peak_bytes, "wall_in_process_s": wall,
           "torch_threads": torch.get_num_threads(), "stage_clock": clock.as_dict(),
           "forced_expert_tokens": sum(sum(c["calibrated"]) - sum(c["routed"]) for c in experts.values()),
           "matmul_before": before, "matmul_after": after}, open(dest, "w"))
"""

# torch.nn.functional.linear (x @ W^T, as the calibration forward calls it) at the shapes calibration runs,
# 16 x 128 tokens in batches of 4 rows (omniq.quant.calibrate.BATCH_SIZE): a routed expert's up / down
# projection gets about 4 x 128 x 6 / 128 = 24 tokens per batch (96 with four times the rows), a dense linear
# (Mamba in_proj, the shared expert) 512.
MATMUL_SIZES = {"expert_up_m24": (24, 2688, 1856), "expert_down_m24": (24, 1856, 2688),
                "expert_up_m96": (96, 2688, 1856), "shared_up_m512": (512, 2688, 3712),
                "mamba_in_m512": (512, 2688, 10304)}


def matmul_rates(sizes: dict = MATMUL_SIZES, windows: int = 5, min_s: float = 0.2) -> dict:
    """This process's matmul rate (FLOP/s) at each size, bf16 and fp32, at its torch thread count: the best of
    `windows` windows of at least `min_s` seconds each, by wall clock (`wall`) and by this process's CPU time
    (`cpu`: what the process got of the cores, so a busy machine lowers it less; with one thread the two agree
    on an idle machine). Returns {"bf16": {"expert_up_m24": {"wall": r, "cpu": r}, ...}, "fp32": ...,
    "threads": n, "load_average": l}."""
    import torch
    import torch.nn.functional as F

    out: dict = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    g = torch.Generator().manual_seed(0)
    for dname, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[dname] = {}
        for name, (m, k, n) in sizes.items():
            x = torch.randn(m, k, generator=g).to(dt)
            w = torch.randn(n, k, generator=g).to(dt)
            F.linear(x, w)                                   # warm-up (oneDNN picks its kernel)
            best_wall = best_cpu = 0.0
            for _ in range(windows):
                t, c, reps = time.perf_counter(), time.process_time(), 0
                while time.perf_counter() - t < min_s:
                    F.linear(x, w)
                    reps += 1
                flops = 2 * m * k * n * reps
                best_wall = max(best_wall, flops / (time.perf_counter() - t))
                best_cpu = max(best_cpu, flops / max(time.process_time() - c, 1e-9))
            out[dname][name] = {"wall": best_wall, "cpu": best_cpu}
    return out


class StageClock:
    """Wall and CPU seconds of the streamed quantize's per-layer steps, by wrapping them in the child process:
    `omniq.export.streamed.materialize` (a layer read from the shards, checked) and `calibrate_layer`
    (ModelOpt's max calibration of the layer over every row: the forward work the FLOPs are counted for);
    and the peak anonymous RSS (RssAnon, sampled every 0.05 s by a thread) during each of those, ModelOpt's
    `export_layer`, omniq's weight calibration of a layer (`LayerByLayer.layer`; norm-tweak's fit of a layer,
    `LayerByLayer._compensate`, inside it, apart as `compensation`, with its wall seconds per layer in
    `layer_wall_s`) and the rest (`other`)."""

    STEPS = ("materialize", "calibrate_layer", "export_layer")

    def __init__(self):
        self.wall = {n: 0.0 for n in self.STEPS + ("weight_calibration", "compensation")}
        self.cpu = dict(self.wall)
        self.layer_wall = {"compensation": []}
        self.peak_anon = {n: 0 for n in self.wall} | {"other": 0}
        self.current = "other"

    def _sample(self, stop: threading.Event) -> None:
        status = Path("/proc/self/status")
        while not stop.is_set():
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    cur = self.current
                    self.peak_anon[cur] = max(self.peak_anon[cur], int(line.split()[1]) * 1024)
            stop.wait(0.05)

    @contextlib.contextmanager
    def installed(self):
        from omniq.export import streamed
        from omniq.quant import weight_calibration

        saved = {n: getattr(streamed, n) for n in self.STEPS}
        saved_layer = weight_calibration.LayerByLayer.layer
        saved_comp = weight_calibration.LayerByLayer._compensate

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t, c, outer = time.perf_counter(), time.process_time(), self.current
                self.current = name
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.current = outer
                    self.wall[name] += time.perf_counter() - t
                    self.cpu[name] += time.process_time() - c
                    if name in self.layer_wall:
                        self.layer_wall[name].append(time.perf_counter() - t)
            return wrapper

        for n, fn in saved.items():
            setattr(streamed, n, timed(n, fn))
        weight_calibration.LayerByLayer.layer = timed("weight_calibration", saved_layer)
        weight_calibration.LayerByLayer._compensate = timed("compensation", saved_comp)
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(stop,), daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            stop.set()
            sampler.join()
            for n, fn in saved.items():
                setattr(streamed, n, fn)
            weight_calibration.LayerByLayer.layer = saved_layer
            weight_calibration.LayerByLayer._compensate = saved_comp

    def as_dict(self) -> dict:
        return {"wall_s": dict(self.wall), "cpu_s": dict(self.cpu), "peak_anon_bytes": dict(self.peak_anon),
                "layer_wall_s": {n: list(v) for n, v in self.layer_wall.items()}}


def wait_idle(max_load: float = 2.5, max_wait_s: float = 600.0) -> float:
    """Wait (up to `max_wait_s`) until the 1-minute load average is at most `max_load`; returns the load."""
    t = time.perf_counter()
    while os.getloadavg()[0] > max_load and time.perf_counter() - t < max_wait_s:
        time.sleep(30)
    return os.getloadavg()[0]


def disk_write_speed(work: Path, size: int = 1 << 30) -> float:
    """Bytes/s of writing `size` bytes sequentially and fsyncing them (the file is removed)."""
    block = os.urandom(1 << 24)
    p = work / "disk-speed.bin"
    t = time.perf_counter()
    with open(p, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    p.unlink()
    return size / dt


def calibration_flops(ckpt_dir: str, tokens: int) -> float:
    """Matmul FLOPs of one calibration pass over `tokens` tokens (linears only; attention scores and the Mamba
    scan are left out, a few percent at 128 tokens per row)."""
    from omniq.model.checkpoint import open_checkpoint

    arch = open_checkpoint(ckpt_dir).arch
    per_token = 0
    for lin in arch.linears:
        if lin.role == "lm_head":
            continue                  # logits_to_keep=1: one position per row, and lm_head is never quantized
        macs = lin.in_features * lin.out_features
        per_token += 2 * macs * (arch.num_experts_per_tok / arch.n_routed_experts if lin.expert is not None else 1)
    return per_token * tokens


def expert_pass_flops(arch) -> float:
    """Matmul FLOPs of one token through one routed expert (its up and down projections): what each token
    that the expert-coverage hooks (`--expert-calibration all`, omniq.calib.experts) force through an
    under-routed expert costs on top of `calibration_flops`."""
    first = next(lin.layer for lin in arch.linears if lin.expert is not None)
    return sum(2 * lin.in_features * lin.out_features for lin in arch.linears
               if lin.expert == 0 and lin.layer == first)


def machine_peak(r: dict, dtype: str = "bf16", clock: str = "cpu") -> tuple[str, float]:
    """(size, rate) of the best matmul rate the child measured before or after its quantize, at any size."""
    rates = {n: max(r[w][dtype][n][clock] for w in ("matmul_before", "matmul_after")) for n in MATMUL_SIZES}
    best = max(rates, key=rates.get)
    return best, rates[best]


def calibration_rates(r: dict, arch) -> dict:
    """Calibration's achieved matmul rate beside this machine's, from one child's record: FLOPs counted
    (routed + forced expert tokens) over `calibrate_layer`'s seconds (the calibration forward, without reading
    the layer), by wall clock and by CPU time, and its ratio to the best bf16 rate the same child measured at
    any size (`machine_peak`: the strictest reference; the expert-sized rate, at which most of the MoE
    layers' FLOPs run, is recorded beside it)."""
    flops = r["calib_flops"] + r.get("forced_expert_tokens", 0) * expert_pass_flops(arch)
    clock = r["stage_clock"]
    out = {"calib_flops_done": flops,
           "calib_flops_per_s": flops / clock["wall_s"]["calibrate_layer"],
           "calib_flops_per_cpu_s": flops / clock["cpu_s"]["calibrate_layer"],
           "calib_stage_flops_per_s": flops / r["seconds"]["calibrate"],      # the stage, reading included
           "read_bytes_per_s": r["bytes_read"] / clock["wall_s"]["materialize"]}
    for c in ("wall", "cpu"):
        size, peak = machine_peak(r, "bf16", c)
        expert = max(r[w]["bf16"]["expert_up_m24"][c] for w in ("matmul_before", "matmul_after"))
        rate = out["calib_flops_per_s" if c == "wall" else "calib_flops_per_cpu_s"]
        out[f"machine_bf16_{c}"] = {"peak_size": size, "peak": peak, "expert_up_m24": expert,
                                     "calib_vs_peak": rate / peak, "calib_vs_expert_m24": rate / expert}
    return out


class Cgroup:
    """A cgroup-v1 memory child group of this process's own group, with a limit; removed on exit."""

    def __init__(self, limit: int):
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
        self.path = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"omniq-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def enter(self) -> None:                         # preexec_fn of the child
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def failcnt(self) -> int:
        return int((self.path / "memory.failcnt").read_text())

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


REAL_PATTERNS = {"rw5": "MEM*E", "rw12": "MEM*EMEM*EME", "real52": None}


def predictions(recipes_: list[str], samples: int, seq_len: int) -> list[dict]:
    """The streamed quantize's predicted peak (`omniq.quant.memory.streamed_estimate`, with the recipe's weight
    calibration as the preflight counts it) on the real widths at 5, 12 and 52 layers, and the whole model's
    BF16 size beside it."""
    from omniq.model.arch import from_config
    from omniq.quant import memory, recipe as recipes
    from omniq.quant.plan import make_plan

    real = json.loads((ROOT / "tests" / "data" / "nemotron-3-nano-30b-a3b.config.json").read_text())
    out = []
    for name, pattern in REAL_PATTERNS.items():
        pattern = pattern or real["hybrid_override_pattern"]
        arch = from_config(dict(real, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern)))
        for r in recipes_:
            rec = recipes.load(r)
            plan = make_plan(arch, rec)
            algos = {lin.name: rec.algorithm_of(lin, arch) for lin in plan.quantized}   # as quantize's preflight
            est = memory.streamed_estimate(plan, samples=samples, seq_len=seq_len, algorithms=algos,
                                           activation=rec.activation_calibration,
                                           compensation=rec.compensation.name != "none")
            out.append({"model": name, "layers": len(pattern), "recipe": r, "predicted_peak_bytes": est.total,
                        "bf16_bytes": memory.weight_bytes(arch), **est.as_dict()})
            print(f"predicted  {name:6} {len(pattern):3} layers {r:10} peak {est.total / 2**30:5.2f} GiB "
                  f"(BF16 model {memory.weight_bytes(arch) / 2**30:6.2f} GiB, "
                  f"{est.total / memory.weight_bytes(arch):.3f} x)", flush=True)
    return out


def _anon_sampler(pid: int, peak: list) -> None:
    """Largest RssAnon of `pid` (sampled every 0.2 s): the process's own memory. ru_maxrss also counts the
    safetensors shards' pages mapped from the page cache (file-backed, reclaimable), several GiB here."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.2)


def run_child(cmd: list[str], log: Path, cgroup: Cgroup | None = None, root: Path = ROOT) -> dict:
    """`cmd` niced, in `root` with `root` on PYTHONPATH (`--baseline`: another checkout's omniq)."""
    import threading

    t = time.perf_counter()
    peak = [0]
    with open(log, "w") as f:
        p = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=root,
                             preexec_fn=cgroup.enter if cgroup else None,
                             env=dict(os.environ, PYTHONPATH=str(root)))
        threading.Thread(target=_anon_sampler, args=(p.pid, peak), daemon=True).start()
        _, status, usage = os.wait4(p.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - t,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_anon_bytes": peak[0],
            "cpu_s": usage.ru_utime + usage.ru_stime, "load_average": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="NAME=DIR of checkpoints made by scripts/make_realwidth.py")
    ap.add_argument("--recipes", default="fp8,omni-nvfp4")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--cgroup-gib", type=float, default=None, help="run every omniq quantize inside this limit")
    ap.add_argument("--plain", default=None, help="also run the plain ModelOpt script on this checkpoint (NAME)")
    ap.add_argument("--work", default=None, help="where outputs go (removed after each run); default a temp dir")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every quantize child (and its "
                    "matmul measurement); OMP_NUM_THREADS / MKL_NUM_THREADS are set to it too")
    ap.add_argument("--max-load", type=float, default=2.5, help="before each run, wait (up to 10 min) until the "
                    "1-minute load average is at most this")
    ap.add_argument("--repeat", type=int, default=1, help="run each checkpoint and recipe this many times")
    ap.add_argument("--baseline", default=None, help="another checkout (a directory with omniq/ and benchmarks/): "
                    "each run is preceded by the same run of that tree's omniq (tool 'omniq-baseline'), so the "
                    "two are compared interleaved under the same load")
    a = ap.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    ckpts = dict(c.split("=", 1) for c in a.checkpoints)
    work = Path(a.work or tempfile.mkdtemp(prefix="omniq-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    doc = {"samples": a.samples, "seq_len": a.seq_len, "cpus": os.cpu_count(), "cgroup_gib": a.cgroup_gib,
           "threads": a.threads, "runs": []}
    disk = [disk_write_speed(work)]       # and again before every run: one sample varied 2-4x on this machine
    doc["disk_write_bytes_per_s"] = disk[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"disk sequential write {disk[0] / 1e6:.0f} MB/s (measured again before each run; matmul rates: "
          "measured inside each quantize child, before and after it)", flush=True)
    trees = ([("omniq-baseline", Path(a.baseline).resolve())] if a.baseline else []) + [("omniq", ROOT)]
    doc["predicted"] = predictions([r for r in a.recipes.split(",") if r] or ["fp8"], a.samples, a.seq_len)
    tokens = a.samples * a.seq_len
    for name, path in ckpts.items():
        from omniq.model.checkpoint import open_checkpoint

        ck = open_checkpoint(path)
        flops = calibration_flops(path, tokens)
        for recipe, _, (tool, root) in ((r, k, t) for r in a.recipes.split(",") if r for k in range(a.repeat)
                                        for t in trees):
            load_before = wait_idle(a.max_load)
            disk.append(disk_write_speed(work))
            tag = f"{name}-{Path(recipe).stem}"          # a recipe may be a YAML path
            out = work / tag
            dest = work / f"{tag}.json"
            cg = Cgroup(int(a.cgroup_gib * 2**30)) if a.cgroup_gib else None
            try:
                r = run_child([sys.executable, "-c", CHILD, path, str(out), recipe, str(a.samples), str(a.seq_len),
                               str(dest), str(a.threads)], work / f"{tag}.log", cg, root)
                if cg:
                    r.update(cgroup_max_usage_bytes=cg.max_usage(), cgroup_failcnt=cg.failcnt())
            finally:
                if cg:
                    cg.close()
            r.update(tool=tool, model=name, recipe=recipe, layers=ck.arch.num_layers, params=ck.arch.num_params,
                     source_bytes=ck.total_bytes, calib_flops=flops, load_average_before=load_before,
                     commit=commit if root == ROOT else str(root), disk_write_before_bytes_per_s=disk[-1])
            if r["rc"] == 0:
                r.update(json.loads(dest.read_text()))
                r.update(calibration_rates(r, ck.arch))
                s = r["seconds"]
                # export: export_layers (each layer packed and written) + the self-check, manifest and lint
                r["write_bytes_per_s"] = r["output_bytes"] / s["export"] if s.get("export") else None
                r["write_layers_bytes_per_s"] = (r["output_bytes"] / s["export_layers"] if s.get("export_layers")
                                                 else None)
            else:
                r["log_tail"] = (work / f"{tag}.log").read_text()[-2000:]
            doc["runs"].append(r)
            _print(r)
            shutil.rmtree(out, ignore_errors=True)
        if a.plain == name:
            from omniq.quant import memory, recipe as recipes
            from omniq.quant.plan import make_plan

            from benchmarks.quantize_bench import PLAIN_MODELOPT

            rows = work / f"{name}-rows.pt"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize_bench.py"), "--make-rows", path,
                            str(a.samples), str(a.seq_len), str(rows)], check=True, cwd=ROOT)
            for recipe in ("fp8",):
                out = work / f"{name}-{recipe}-plain"
                r = run_child([sys.executable, "-c", PLAIN_MODELOPT, path, str(out), recipe, str(rows)],
                              work / f"{name}-{recipe}-plain.log")
                est = memory.estimate(make_plan(ck.arch, recipes.load(recipe)), batch=4, seq_len=a.seq_len)
                r.update(tool="modelopt-plain", model=name, recipe=recipe, layers=ck.arch.num_layers,
                         params=ck.arch.num_params, source_bytes=ck.total_bytes, predicted_peak_bytes=est.total,
                         calib_flops=flops)
                if r["rc"]:
                    r["log_tail"] = (work / f"{name}-{recipe}-plain.log").read_text()[-2000:]
                doc["runs"].append(r)
                _print(r)
                shutil.rmtree(out, ignore_errors=True)
    disk.append(disk_write_speed(work))
    doc["disk_write_samples_bytes_per_s"] = disk
    doc["disk_write_bytes_per_s"] = sorted(disk)[len(disk) // 2]       # the median of this invocation's samples
    for r in doc["runs"]:
        if r.get("write_bytes_per_s"):
            r["write_vs_disk_median"] = r["write_bytes_per_s"] / doc["disk_write_bytes_per_s"]
            r["write_vs_disk_before"] = r["write_bytes_per_s"] / r["disk_write_before_bytes_per_s"]
    print("disk sequential write samples " + ", ".join(f"{d / 1e6:.0f}" for d in disk) +
          f" MB/s, median {doc['disk_write_bytes_per_s'] / 1e6:.0f}; export over the whole stage / median: " +
          ", ".join(f"{r['tool']} {r['recipe']} {r['write_vs_disk_median']:.2f}" for r in doc["runs"]
                    if r.get("write_vs_disk_median")))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if Path(a.out).is_file():      # runs of earlier invocations (other checkpoints or recipes) are kept
        old = json.loads(Path(a.out).read_text())
        def key(r):
            return r["model"], r["recipe"], r["tool"], "cgroup_max_usage_bytes" in r

        mine = {key(r) for r in doc["runs"]}
        doc["runs"] = [r for r in old.get("runs", []) if key(r) not in mine] + doc["runs"]
        doc["machine_runs"] = old.get("machine_runs", []) + [{k: old[k] for k in ("disk_write_bytes_per_s",
                                                                                  "matmul_flops_per_s") if k in old}]
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in doc["runs"]) else 1


def _print(r: dict) -> None:
    gib = 2**30
    line = (f"{r['model']:5} {r['layers']:3} layers {r['recipe']:10} {r['tool']:14} rc {r['rc']}  wall "
            f"{r['wall_s']:7.1f} s"
            + (f" (quantize {r['seconds']['total']:.1f} s)" if r.get("seconds", {}).get("total") else "")
            + f"  peak RSS {r['peak_rss_bytes'] / gib:6.2f} GiB"
            f" (anonymous {r.get('peak_anon_bytes', 0) / gib:5.2f} GiB)")
    if r.get("predicted_peak_bytes"):
        line += f"  predicted {r['predicted_peak_bytes'] / gib:6.2f} GiB"
    if "cgroup_max_usage_bytes" in r:
        line += f"  cgroup max {r['cgroup_max_usage_bytes'] / gib:5.2f} GiB"
    if r.get("seconds"):
        s = r["seconds"]
        line += "  stages " + ", ".join(f"{k} {v:.0f}" for k, v in s.items() if k in ("prepare", "load", "calibrate",
                                                                                    "export_layers", "export"))
    if r.get("write_bytes_per_s"):
        line += (f"  export writes {r['write_bytes_per_s'] / 1e6:.0f} MB/s (packing + writing alone "
                 f"{r['write_layers_bytes_per_s'] / 1e6:.0f}; disk just before "
                 f"{r.get('disk_write_before_bytes_per_s', 0) / 1e6:.0f})  layers read "
                 f"{r['read_bytes_per_s'] / 1e6:.0f} MB/s")
    print(line, flush=True)
    steps = (r.get("stage_clock") or {}).get("peak_anon_bytes")
    if steps:
        print("      peak anonymous RSS by step: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in steps.items())
              + "; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_clock"]["wall_s"].items()), flush=True)
    if r.get("calib_flops_per_s"):
        w, c = r["machine_bf16_wall"], r["machine_bf16_cpu"]
        print(f"      calibration {r['calib_flops_done'] / 1e12:.2f} TFLOP ({r.get('forced_expert_tokens', 0)} "
              f"forced expert tokens): {r['calib_flops_per_s'] / 1e9:.1f} GFLOP/s wall, "
              f"{r['calib_flops_per_cpu_s'] / 1e9:.1f} per CPU second ({r['calib_stage_flops_per_s'] / 1e9:.1f} "
              f"over the whole calibrate stage, reading included); machine bf16 peak {w['peak'] / 1e9:.1f} wall / "
              f"{c['peak'] / 1e9:.1f} CPU GFLOP/s ({c['peak_size']}), expert-sized {c['expert_up_m24'] / 1e9:.1f} "
              f"CPU: calibration / peak {w['calib_vs_peak']:.2f} wall, {c['calib_vs_peak']:.2f} CPU "
              f"(/ expert-sized {c['calib_vs_expert_m24']:.2f} CPU); load {r['load_average_before']:.1f} before, "
              f"{r['load_average']:.1f} after", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
