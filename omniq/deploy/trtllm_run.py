"""`omniq build --execute`: load a bundle with TensorRT-LLM's LLM API on this host and measure it.

Thin on purpose: everything it relies on (the options, the checkpoint, the decision) is built and tested
elsewhere. `check_runtime` runs before anything is written and refuses (exit 2) on hosts without
`tensorrt_llm` or CUDA; `run_bundle` loads, warms up, runs a short smoke generation and a throughput
measurement, and returns the figures that go into `build.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

from omniq.errors import GateFailed, OmniqError

SMOKE_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SMOKE_TOKENS = 32
THROUGHPUT_INPUT_WORDS = 96
THROUGHPUT_TOKENS = 128
THROUGHPUT_MAX_REQUESTS = 64


def check_runtime() -> tuple[str, int]:
    """(installed TensorRT-LLM version, SM of GPU 0), or OmniqError when this host cannot execute."""
    try:
        import tensorrt_llm  # noqa: F401  (heavy: imported only for --execute)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken native install
        raise OmniqError(f"--execute needs TensorRT-LLM with CUDA on this host, but `import tensorrt_llm` failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install it from "
                         "NVIDIA's index or run in NVIDIA's release container, or drop --execute and run serve.sh "
                         "/ bench.sh on the target") from None
    import torch

    if not torch.cuda.is_available():
        raise OmniqError("--execute needs a CUDA GPU, but torch.cuda.is_available() is False on this host; drop "
                         "--execute and run the bundle's serve.sh / bench.sh on the target GPU")
    major, minor = torch.cuda.get_device_capability(0)
    return str(getattr(tensorrt_llm, "__version__", "unknown")), 10 * major + minor


def run_bundle(bundle: Path, options: dict, max_batch: int) -> dict:
    """Load `bundle/checkpoint` through the LLM API with `options`, warm up, smoke-generate, measure."""
    import torch
    from tensorrt_llm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(bundle / "checkpoint"), **options)
    load_s = time.perf_counter() - t0
    free, total = torch.cuda.mem_get_info(0)
    used = total - free
    try:
        greedy = SamplingParams(max_tokens=SMOKE_TOKENS, temperature=0.0)
        t0 = time.perf_counter()
        llm.generate(SMOKE_PROMPTS[:1], greedy)
        warmup_s = time.perf_counter() - t0

        outs = llm.generate(SMOKE_PROMPTS, greedy)
        smoke = [{"prompt": o.prompt, "text": o.outputs[0].text, "tokens": len(o.outputs[0].token_ids)}
                 for o in outs]
        if not all(s["tokens"] > 0 and s["text"].strip() for s in smoke):
            raise GateFailed(f"{bundle}: the smoke generation returned empty text; the bundle loads but does not "
                             "generate")

        n = min(max_batch, THROUGHPUT_MAX_REQUESTS)
        prompt = " ".join(["token"] * THROUGHPUT_INPUT_WORDS)
        fixed = SamplingParams(max_tokens=THROUGHPUT_TOKENS, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate([prompt] * n, fixed)
        seconds = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return {
            "device": torch.cuda.get_device_name(0),
            "load_s": round(load_s, 2),
            "warmup_s": round(warmup_s, 2),
            "smoke": smoke,
            "throughput": {"requests": n, "output_tokens": generated, "seconds": round(seconds, 3),
                           "output_tokens_per_s": round(generated / seconds, 1) if seconds > 0 else None},
            "gpu0_memory_in_use_gib": round(used / 2**30, 2),   # device-wide: the engine may run in workers
        }
    finally:
        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
