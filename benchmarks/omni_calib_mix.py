"""Text-only vs multimodal calibration of the bundled tiny Omni, measured per evaluation modality.

    .venv/bin/python benchmarks/omni_calib_mix.py [--media-samples 64] [--out DIR]

Quantizes `tiny-omni` with `omni-nvfp4` twice (16 x 128 calibration tokens; `--calib-mix text:1` and the
default text:0.5,image:0.25,audio:0.25), validates both against the BF16 source with `omniq validate`
(text: bundled eval split, 16 rows x 128; image / audio: the bundled eval split, captions scored) and prints
the markdown table of docs/omni.md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIXES = {"text-only (`--calib-mix text:1`)": ["--calib-mix", "text:1"],
         "multimodal (default: text 0.5, image 0.25, audio 0.25)": []}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--media-samples", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--calib", nargs=2, type=int, default=(16, 128), metavar=("SAMPLES", "SEQ_LEN"))
    ap.add_argument("--eval", nargs=2, type=int, default=(16, 128), metavar=("SAMPLES", "SEQ_LEN"),
                    help="text evaluation rows (benchmarks/figures.py --quick passes small sizes)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="omni-calib-mix-"))
    omniq = [str(Path(sys.executable).parent / "omniq")]
    rows = []
    for k, (label, mix) in enumerate(MIXES.items()):
        art = root / f"art{k}"
        if not art.exists():
            subprocess.run([*omniq, "quantize", "tiny-omni", "--recipe", "omni-nvfp4", "--out", str(art),
                            "--calib-samples", str(args.calib[0]), "--calib-seq-len", str(args.calib[1]), *mix],
                           check=True, capture_output=True)
        rep = root / f"report{k}.json"
        subprocess.run([*omniq, "validate", "tiny-omni", str(art), "--samples", str(args.eval[0]),
                        "--seq-len", str(args.eval[1]),
                        "--media-samples", str(args.media_samples), "--report", str(rep), "--force"],
                       capture_output=True)
        r = json.loads(rep.read_text())
        rows.append((label, r["modalities"]))
    print("| calibration | eval set | tokens scored | mean KL | top-1 agreement | ppl ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, mods in rows:
        for m in ("text", "image", "audio"):
            x = mods[m]
            print(f"| {label} | {m}{'' if m == 'text' else '+text'} | {x['tokens']} | {x['kl_mean']:.4f} | "
                  f"{100 * x['top1_agreement']:.2f} % | {x['ppl_ratio']:.4f} |")

    print()
    print(input_scale_table(root / "art0", root / "art1"))


def input_scale_table(text_art: Path, mm_art: Path) -> str:
    """Ratio multimodal / text-only of every activation scale, by layer role."""
    import re
    import statistics

    from safetensors import safe_open

    def scales(d):
        out = {}
        for f in Path(d).glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                for n in sf.keys():
                    if n.endswith(("input_scale", "k_scale", "v_scale")):
                        out[n] = sf.get_tensor(n).float().item()
        return out

    a, b = scales(text_art), scales(mm_art)
    roles: dict[str, list[float]] = {}
    for n in a:
        r = re.sub(r"layers\.\d+\.", "", n.split("backbone.")[-1])
        roles.setdefault(re.sub(r"experts\.\d+\.", "experts.", r), []).append(b[n] / a[n])
    lines = ["| scale | tensors | min | median | max |", "| --- | ---: | ---: | ---: | ---: |"]
    for r, v in sorted(roles.items()):
        lines.append(f"| `{r}` | {len(v)} | {min(v):.3f} | {statistics.median(v):.3f} | {max(v):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
