"""Make real ModelOpt artifacts of a BF16 NemotronH for the validate tests (run as a separate process).

    python tests/validate/make_artifacts.py SRC OUT fp8 nvfp4 mixed fp8-kv nvfp4-kv [--rows 16 --seq 256]

Each name becomes OUT/NAME: ModelOpt's max calibration on the bundled calibration text, then
`export_hf_checkpoint`, with the tokenizer files copied. It runs in its own process because a failure
inside ModelOpt's quantized fused-experts forward leaves `torch.nn.functional.linear` patched for the rest
of the process (reference notes, defect 2), and so the test process never imports ModelOpt.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def calibration_rows(tokenizer, rows: int, seq: int) -> torch.Tensor:
    from omniq.calib import docstrings

    ids: list[int] = []
    for doc in docstrings.texts("calib"):
        ids += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= rows * seq:
            break
    return torch.tensor(ids[: rows * seq]).view(rows, seq)


def config_for(name: str) -> dict:
    """fp8 / nvfp4: ModelOpt's presets (every linear but lm_head); mixed: NVFP4 routed experts and FP8
    everything else, as NVIDIA's NVFP4 releases mix them; a `-kv` suffix adds the FP8 KV cache."""
    import modelopt.torch.quantization as mtq

    base = name.split("-")[0]
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG if base == "nvfp4" else mtq.FP8_DEFAULT_CFG)
    if base == "mixed":
        nvfp4 = [e for e in mtq.NVFP4_DEFAULT_CFG["quant_cfg"]
                 if e.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer")]
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
            dict(copy.deepcopy(e), quantizer_name="*mixer.experts*" + e["quantizer_name"][1:]) for e in nvfp4]
    if name.endswith("-kv"):
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def make(src: Path, out: Path, name: str, rows: int, seq: int) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer, NemotronHForCausalLM

    tok = AutoTokenizer.from_pretrained(str(src))
    model = NemotronHForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.config.use_cache = False
    model.eval()
    data = calibration_rows(tok, rows, seq)

    def loop(m):
        with torch.no_grad():
            for i in range(0, rows, 4):
                m(input_ids=data[i:i + 4], use_cache=False)

    mtq.quantize(model, config_for(name), loop)
    dest = out / name
    export_hf_checkpoint(model, export_dir=str(dest))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("names", nargs="+")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for name in args.names:
        make(Path(args.src), Path(args.out), name, args.rows, args.seq)
        print(f"made {name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
