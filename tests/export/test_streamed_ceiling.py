"""The ceiling, proven: `omniq quantize` of real-width checkpoints inside a 6 GiB cgroup-v1 memory limit.

Slow (a 5-layer real-width checkpoint is 6.3 GiB of BF16 and quantizes in minutes on 2 cores) and needs root
and the cgroup-v1 memory controller (`/sys/fs/cgroup/memory`). The checkpoint is made by
scripts/make_realwidth.py into a temporary directory unless OMNIQ_REALWIDTH_DIRS names existing ones
(comma-separated). The same runs with timings: benchmarks/quantize_scale.py --cgroup-gib 6.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference_configs import REPO

LIMIT = 6 * 2**30
pytestmark = pytest.mark.slow


def _cgroup_child(tag):
    own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
               if "memory" in line.split(":", 2)[1].split(","))
    d = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"omniq-test-{tag}-{os.getpid()}"
    try:
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(LIMIT))
    except OSError as e:
        pytest.skip(f"no writable cgroup-v1 memory controller ({e})")
    return d


def _checkpoints(tmp_path_factory):
    given = os.environ.get("OMNIQ_REALWIDTH_DIRS")
    if given:
        return [Path(p) for p in given.split(",")]
    d = tmp_path_factory.mktemp("realwidth") / "rw5"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_realwidth.py"), str(d), "--pattern", "MEM*E"],
                   check=True, timeout=3600)
    return [d]


@pytest.mark.parametrize("recipe", ["fp8", "omni-nvfp4"])
def test_quantize_real_width_inside_6_gib(tmp_path_factory, tmp_path, recipe):
    if not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("no cgroup-v1 memory controller")
    for ckpt in _checkpoints(tmp_path_factory):
        cg = _cgroup_child(recipe)
        try:
            out = tmp_path / f"{ckpt.name}-{recipe}"
            p = subprocess.run([sys.executable, "-m", "omniq.cli", "quantize", str(ckpt), "--calib", "tiny-calib", "--recipe", recipe,
                                "--out", str(out), "--calib-samples", "16", "--calib-seq-len", "128"],
                               capture_output=True, text=True, timeout=7200,
                               preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
            assert p.returncode == 0, p.stderr[-3000:]
            peak = int((cg / "memory.max_usage_in_bytes").read_text())
            assert peak <= LIMIT
            assert (out / "omniq.json").is_file() and (out / "lint.json").is_file()
        finally:
            subprocess.run(["rm", "-rf", str(tmp_path / f"{ckpt.name}-{recipe}")])
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    import time

                    time.sleep(0.1)
