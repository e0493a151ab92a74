"""`omniq validate` at the real width: peak RSS and time of the layer-streamed validate of a real-width
checkpoint against its FP8 artifact, free and inside a cgroup-v1 memory limit.

    python benchmarks/validate_realwidth.py WORKDIR [--reference DIR] [--pattern MEM*E] [--samples 4]
                                            [--seq-len 128] [--cgroup-gib 6] [--reference-cache] [--keep]

WORKDIR (never inside the repository) receives what is missing: the reference, made by
scripts/make_realwidth.py (the real Nemotron 3 Nano 30B-A3B widths, random weights, hub layout; `MEM*E` is
3.4 B parameters, 6.3 GiB), unless --reference names an existing one; its FP8 artifact, made by
`omniq quantize --recipe fp8`. Then `omniq validate REFERENCE ARTIFACT` runs in a child process, once free
and once inside a fresh child of this process's cgroup-v1 memory group with `memory.limit_in_bytes` set to
--cgroup-gib (needs root and /sys/fs/cgroup/memory; skipped with a line otherwise). Printed: wall time,
peak RSS of the child (`ru_maxrss`), the cgroup's `memory.max_usage_in_bytes` (page cache of the mapped
shards included), validate's own memory estimate, the report's metrics. `--reference-cache`: validate
keeps the reference's streams in WORKDIR/reference-cache; a free run fills it, a second free run and the
limited one hit it (only the candidate's stream runs). What this script generated is deleted at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _run(cmd: list[str], cgroup: Path | None = None) -> tuple[subprocess.CompletedProcess, float, int]:
    """(process, seconds, peak RSS bytes of that child, from its own rusage) for one command."""
    import tempfile

    pre = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup is not None else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, preexec_fn=pre,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        p = subprocess.CompletedProcess(cmd, child.returncode, out.read(), err.read())
    return p, seconds, usage.ru_maxrss * 1024


def cgroup_child(limit_bytes: int, tag: str) -> Path | None:
    """A fresh child of this process's cgroup-v1 memory group with the limit set, or None (printed why)."""
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
        d = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"omniq-{tag}-{os.getpid()}"
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return d
    except (OSError, StopIteration) as e:
        print(f"no writable cgroup-v1 memory controller ({e}); the limited run is skipped")
        return None


def remove_cgroup(d: Path) -> None:
    for _ in range(50):
        try:
            d.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--pattern", default="MEM*E")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--cgroup-gib", type=float, default=6.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only-cgroup", action="store_true", help="skip the run without a limit")
    ap.add_argument("--reference-cache", action="store_true",
                    help="validate with --reference-cache: a run that fills it, then runs that hit it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = args.work.resolve()
    if ROOT in work.parents or work == ROOT:
        sys.exit("WORKDIR must be outside the repository")
    work.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    py = sys.executable
    result: dict = {"pattern": args.pattern, "samples": args.samples, "seq_len": args.seq_len}
    try:
        ref = args.reference or work / f"rw-{args.pattern.replace('*', 'A')}"
        if not (ref / "config.json").is_file():
            made.append(ref)
            p, s, rss = _run([py, str(ROOT / "scripts" / "make_realwidth.py"), str(ref), "--pattern", args.pattern])
            assert p.returncode == 0, p.stderr[-3000:]
            result["make_seconds"] = round(s, 1)
        cand = work / f"{ref.name}-fp8"
        if not (cand / "config.json").is_file():
            made.append(cand)
            p, s, rss = _run([py, "-m", "omniq.cli", "quantize", str(ref), "--calib", "tiny-calib", "--recipe", "fp8", "--out", str(cand),
                              "--calib-samples", "4", "--calib-seq-len", "128", "--force"])
            assert p.returncode == 0, p.stderr[-3000:]
            result["quantize"] = {"seconds": round(s, 1), "peak_rss_gib": round(rss / GIB, 2)}
            print(f"quantize fp8: {s:.0f} s, peak RSS {rss / GIB:.2f} GiB")
        size = sum(f.stat().st_size for f in ref.glob("*.safetensors"))
        result["reference_gib"] = round(size / GIB, 2)
        report = work / "validate.json"
        cmd = [py, "-m", "omniq.cli", "validate", str(ref), str(cand), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--report", str(report)]
        runs = {} if args.only_cgroup else {"free": None}
        cache = work / "reference-cache"
        if args.reference_cache:          # the first run fills the cache, the next ones hit it
            shutil.rmtree(cache, ignore_errors=True)
            made.append(cache)
            cmd += ["--reference-cache", str(cache)]
            runs = {} if args.only_cgroup else {"free, reference cache miss": None, "free, reference cache hit": None}
        cg = cgroup_child(int(args.cgroup_gib * GIB), "validate") if args.cgroup_gib else None
        if cg is not None:
            runs[f"cgroup {args.cgroup_gib:g} GiB" + (", reference cache" if args.reference_cache else "")] = cg
        for label, group in runs.items():
            report.unlink(missing_ok=True)
            p, s, rss = _run(cmd, group)
            entry = {"rc": p.returncode, "seconds": round(s, 1), "peak_rss_gib": round(rss / GIB, 2)}
            if group is not None:
                entry["cgroup_max_usage_gib"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / GIB, 2)
                entry["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
                remove_cgroup(group)
            if report.is_file():
                r = json.loads(report.read_text())
                entry.update({k: r[k] for k in ("kl_mean", "top1_agreement", "ppl_ratio", "tokens", "passed")})
                entry["noise_floor_kl_mean"] = (r.get("noise_floor") or {}).get("kl_mean")
                entry["estimate_gib"] = round(r["memory"]["total_bytes"] / GIB, 2)
                entry["largest_step_gib"] = round(r["memory"]["largest_step_bytes"] / GIB, 2)
                if "reference_cache" in r:
                    entry["reference_cache_hit"] = r["reference_cache"]["hit"]
            else:
                entry["stderr"] = p.stderr.strip().splitlines()[-1:] if p.stderr else []
            result[label] = entry
            print(f"validate ({label}): rc {p.returncode}, {s:.0f} s, peak RSS {rss / GIB:.2f} GiB"
                  + (f", cgroup peak {entry['cgroup_max_usage_gib']} GiB, failcnt {entry['cgroup_failcnt']}"
                     if group is not None else "")
                  + (f", estimate {entry['estimate_gib']} GiB (largest layer of both {entry['largest_step_gib']} GiB),"
                     f" {entry['tokens']} tokens, KL {entry['kl_mean']:.3g}, noise floor KL "
                     f"{entry['noise_floor_kl_mean']:.3g}" if "estimate_gib" in entry else f" {entry.get('stderr')}"),
                  flush=True)
        print(f"reference {result['reference_gib']} GiB of BF16 ({args.pattern}); peak RSS / reference size: "
              + ", ".join(f"{k} {v['peak_rss_gib'] / result['reference_gib']:.2f}" for k, v in result.items()
                          if isinstance(v, dict) and "peak_rss_gib" in v and k != "quantize"))
    finally:
        if not args.keep:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
