"""Print the real Nemotron 3 Nano Omni towers' sizes, built from config alone on the `meta` device.

    python scripts/real_towers.py

The config is tests/reference_configs.py's `omni_real_config` around the published text-backbone config
(shared/reference/omni-layout.md's widths); the modules are transformers' RadioModel and ParakeetEncoder as
omniq builds them (omniq.model.radio / parakeet). No weights are read or allocated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_configs import DATA, omni_real_config  # noqa: E402

from omniq.model import omni, parakeet, radio, towers  # noqa: E402


def main() -> None:
    cfg = omni_real_config(json.loads((DATA / "nemotron-3-nano-30b-a3b.config.json").read_text()))
    v, s = towers.vision_spec(cfg), towers.sound_spec(cfg)
    names = towers.tower_tensors(cfg)
    by_part: dict[str, int] = {}
    for name, shape in names.items():
        n = 1
        for d in shape:
            n *= d
        part = omni.component_of(name)
        by_part[part] = by_part.get(part, 0) + n
    vit, enc = radio.build(v), parakeet.build(s)
    print(f"vision tower: RadioModel width {v.width}, {v.layers} layers, {v.heads} heads, "
          f"{sum(p.numel() for p in vit.parameters()) / 1e6:.1f} M parameters; "
          f"{v.tokens_per_tile} tokens per {v.image_size} px tile")
    print(f"audio encoder: ParakeetEncoder width {s.width}, {s.layers} layers, {s.mel_bins} mel bins, "
          f"{sum(p.numel() for p in enc.parameters()) / 1e6:.1f} M parameters; "
          f"{s.tokens(s.frames(s.sampling_rate))} tokens per second of audio")
    for part, n in by_part.items():
        print(f"  {part}: {n / 1e6:.1f} M")
    total = sum(by_part.values())
    print(f"checkpoint tower tensors: {len(names)}, {total / 1e9:.3f} B parameters, {total * 2 / 2**30:.2f} GiB BF16")


if __name__ == "__main__":
    main()
