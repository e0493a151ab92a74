"""NVFP4 packing speed on one real-width expert matrix (1856 x 2688 BF16), one thread.

    python benchmarks/nvfp4_pack_speed.py [--rounds 7] [--rows 1856] [--cols 2688] [--chunks 65536,262144,1048576]

Times, interleaved round by round (best of the rounds; a shared machine's timings are noisy, the ratios in
one run are what count), and checks that every variant writes the same bytes:
  pack definition    the packing before session 5: the whole matrix divided by its block scales in float32,
                     then `pack_e2m1(e2m1_encode(...))` (seven threshold passes), each pass a fresh temporary;
  pack omniq         `formats.nvfp4_pack` as shipped (chunked, arithmetic encoder, reused buffers), and at
                     the other chunk sizes given;
  pack modelopt      ModelOpt's `NVFP4QTensor.quantize` with the same scales (its CPU path);
  scales definition  `abs().amax(-1)` over the BF16 blocks, then the scale arithmetic;
  scales omniq       `formats.nvfp4_block_scales` as shipped (max over sign-cleared bit patterns).
Prints one line per variant (ms, x faster than its definition) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=1856)
    ap.add_argument("--cols", type=int, default=2688)
    ap.add_argument("--chunks", default="65536,262144,1048576")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from omniq.quant.formats import nvfp4 as fm

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(a.rows, a.cols, generator=g) * 0.02).to(torch.bfloat16)
    ws2 = fm.nvfp4_global_scale(w.float().abs().amax())
    ws = fm.nvfp4_block_scales(w, ws2)

    def pack_definition():
        scaled = fm._blocks(w.float(), 16) / (ws.float() * ws2).unsqueeze(-1)
        return fm.pack_e2m1(fm.e2m1_encode(scaled.flatten(-2)))

    def scales_definition():
        scale = fm._blocks(w, 16).abs().amax(-1).float() / (fm.E2M1_MAX * ws2)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale.clamp(fm.E4M3_MIN_SCALE, fm.E4M3_MAX).to(torch.float8_e4m3fn)

    variants = {"pack definition": pack_definition, "pack omniq": lambda: fm.nvfp4_pack(w, ws, ws2)}
    for chunk in (int(c) for c in a.chunks.split(",") if c):
        variants[f"pack omniq chunk {chunk}"] = lambda chunk=chunk: fm.nvfp4_pack(w, ws, ws2, chunk_elements=chunk)
    variants["pack modelopt"] = lambda: NVFP4QTensor.quantize(w, 16, ws, ws2)[0]._quantized_data
    variants["scales definition"] = scales_definition
    variants["scales omniq"] = lambda: fm.nvfp4_block_scales(w, ws2)

    packed, scales = pack_definition(), scales_definition().view(torch.uint8)
    for name, f in variants.items():
        r = f()
        ref = packed if name.startswith("pack") else scales
        assert torch.equal(r.view(torch.uint8), ref), f"{name} writes other bytes"

    load_before = os.getloadavg()[0]
    best = {name: float("inf") for name in variants}
    for _ in range(a.rounds):
        for name, f in variants.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"{a.rows} x {a.cols} bf16, {a.threads} thread(s), best of {a.rounds} interleaved rounds, "
          f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}; every variant's bytes identical")
    for name, s in best.items():
        base = best["pack definition" if name.startswith("pack") else "scales definition"]
        print(f"  {name:28s} {s * 1e3:7.1f} ms  {base / s:5.2f} x the definition")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
