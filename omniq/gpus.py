"""The GPU targets `omniq build` knows: name -> streaming-multiprocessor version, memory, family.

One row per GPU, plus architecture names (`hopper`, `sm100`, ...) that stand for the smallest-memory GPU of
that architecture, so a memory check against an architecture name is never optimistic.

Memory is the marketed capacity per GPU counted in GiB (H100 80, H200 141, B200 180, ...). The driver
reports slightly less than the marketed figure on some parts (an H100 shows about 79.6 GiB); the runtime
reserve of the memory model (`omniq.deploy.gpu_memory`) absorbs that difference.

What each SM can run is the TensorRT-LLM hardware matrix (shared/reference/tensorrt-llm-notes.md):
FP8 per-tensor on sm89 and newer, native NVFP4 GEMMs from Blackwell (sm100) on; NVFP4 checkpoints reach
Hopper (sm90) only through the W4A16 fallback decided in `omniq.deploy.trtllm`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniq.errors import OmniqError


@dataclass(frozen=True)
class Gpu:
    name: str            # the name `--gpu` takes: h100, b200, rtx-pro-6000, ...
    label: str           # what NVIDIA calls it
    sm: int              # compute capability as 10 * major + minor (90, 100, 103, 120, ...)
    memory_gib: float    # per GPU
    family: str          # ampere, ada, hopper, blackwell

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def fp8(self) -> bool:
        """FP8 (E4M3) tensor cores: Ada (sm89), Hopper and Blackwell."""
        return self.sm >= 89

    @property
    def nvfp4(self) -> bool:
        """Native NVFP4 (E2M1 with FP8 block scales) tensor cores: Blackwell only."""
        return self.sm >= 100

    @property
    def datacenter_blackwell(self) -> bool:
        """sm100 / sm103 (B200, GB200, B300, GB300): the GPUs TensorRT-LLM's TRTLLM-gen MoE kernels target."""
        return 100 <= self.sm < 110

    def as_dict(self) -> dict:
        return {"gpu": self.name, "label": self.label, "sm": self.sm, "memory_gib": self.memory_gib,
                "family": self.family}


GPUS: dict[str, Gpu] = {g.name: g for g in (
    # Ampere: no FP8, no FP4 (kept so that FP8 / NVFP4 requests get a clear refusal)
    Gpu("a100", "A100 SXM 80GB", 80, 80, "ampere"),
    Gpu("a10", "A10 24GB", 86, 24, "ampere"),
    Gpu("a6000", "RTX A6000 48GB", 86, 48, "ampere"),
    # Ada: FP8 per-tensor, no FP4
    Gpu("l40s", "L40S 48GB", 89, 48, "ada"),
    Gpu("l4", "L4 24GB", 89, 24, "ada"),
    # Hopper
    Gpu("h100", "H100 SXM 80GB", 90, 80, "hopper"),
    Gpu("h100-nvl", "H100 NVL 94GB", 90, 94, "hopper"),
    Gpu("h200", "H200 SXM 141GB", 90, 141, "hopper"),
    Gpu("gh200", "GH200 96GB (Hopper GPU of Grace Hopper)", 90, 96, "hopper"),
    # Blackwell data centre
    Gpu("b200", "B200 180GB", 100, 180, "blackwell"),
    Gpu("gb200", "GB200 (per Blackwell GPU) 186GB", 100, 186, "blackwell"),
    Gpu("b300", "B300 (Blackwell Ultra) 288GB", 103, 288, "blackwell"),
    Gpu("gb300", "GB300 (per Blackwell Ultra GPU) 288GB", 103, 288, "blackwell"),
    # Blackwell workstation / desktop / Spark
    Gpu("rtx-pro-6000", "RTX PRO 6000 Blackwell 96GB", 120, 96, "blackwell"),
    Gpu("rtx-5090", "GeForce RTX 5090 32GB", 120, 32, "blackwell"),
    Gpu("gb10", "GB10 (DGX Spark) 128GB unified memory", 121, 128, "blackwell"),
)}

# Architecture names and SM numbers -> the smallest-memory GPU of that architecture.
ALIASES: dict[str, str] = {
    "hopper": "h100", "sm90": "h100",
    "blackwell": "b200", "sm100": "b200",
    "blackwell-ultra": "b300", "sm103": "b300",
    "sm120": "rtx-pro-6000",
    "sm121": "gb10", "dgx-spark": "gb10", "spark": "gb10",
    "ada": "l4", "sm89": "l4",
    "ampere": "a10", "sm80": "a100", "sm86": "a10",
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def resolve_gpu(name: str) -> Gpu:
    """`--gpu` value -> Gpu; architecture names stand for the smallest-memory GPU of that architecture."""
    key = _normalise(name)
    key = ALIASES.get(key, key)
    gpu = GPUS.get(key)
    if gpu is None:
        known = ", ".join(sorted(set(GPUS) | set(ALIASES)))
        raise OmniqError(f"--gpu {name!r}: unknown target; known: {known}")
    return gpu
