"""omniq: quantize NemotronH / Nemotron 3 Nano Omni checkpoints to FP8 and NVFP4, and prove what it cost."""

__version__ = "0.1.0"
