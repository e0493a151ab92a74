"""The ceiling, proven: `omniq validate` of a real-width checkpoint against its FP8 artifact inside a 6 GiB
cgroup-v1 memory limit (the whole-model validate was killed at 20 GiB).

Slow (a 5-layer real-width checkpoint is 6.3 GiB of BF16; making it and its FP8 artifact takes minutes) and
needs root and the cgroup-v1 memory controller. OMNIQ_REALWIDTH_DIR names an existing real-width checkpoint
(else scripts/make_realwidth.py makes one in a temporary directory). Figures and timings:
benchmarks/validate_realwidth.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_validate_real_width_inside_6_gib(tmp_path):
    import validate_realwidth as bench

    if not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("no cgroup-v1 memory controller")
    ref = os.environ.get("OMNIQ_REALWIDTH_DIR")
    args = [str(tmp_path), "--samples", "2", "--seq-len", "128", "--cgroup-gib", "6"]
    result = bench.main(args + (["--reference", ref] if ref else []))
    limited = result.get("cgroup 6 GiB")
    if limited is None:
        pytest.skip("no writable cgroup-v1 memory group")
    assert limited["rc"] == 0, limited
    assert limited["cgroup_max_usage_gib"] <= 6.0 and limited["tokens"] == 2 * 128
    assert limited["kl_mean"] == result["free"]["kl_mean"]
