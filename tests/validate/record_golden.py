"""Record the reports of `omniq validate` on the test artifacts, as the golden the streamed validate is held to.

    python tests/validate/record_golden.py WORKDIR [--out FILE] [--validate-with TREE] [--cases NAME,...] [--force]

Makes the artifacts exactly as the test fixtures do (tests/validate/conftest.py `artifacts`: make_artifacts.py
fp8 nvfp4 nvfp4-kv mixed --rows 4 --seq 128; tests/conftest.py `omni_quantized["mm"]`: `omniq quantize
tiny-omni --recipe omni-nvfp4` with the tests' calibration size), always with this tree's code (so the digests
are those of the artifacts the tests here make), and runs `validate` on them with the cases of `CASES`, and the
noise floor (`noise_floor`: the reference as a BF16 engine runs it) on the same rows, with the omniq of TREE
(default: this tree). The goldens checked in were recorded with the whole-model, in-memory validate of commit
9fa423e (before the layer-streamed one); golden.check holds the streamed reports of test_validate.py and
test_omni_validate.py to them field for field:

- data/golden_reports.json (a CPU without AMX BF16): this script at 9fa423e (commit 1ce0244), artifacts and
  reports from one tree;
- data/golden_reports_amx.json and golden_reports_amx_2threads.json (a CPU with AMX BF16, where 9fa423e's
  reports differ and its audio set with the thread count): artifacts by main's code (at 93f95af: the same
  digests as the file above), reports by 9fa423e's, run from a main checkout as
      git worktree add --detach OLD 9fa423e
      OMP_NUM_THREADS=1 python tests/validate/record_golden.py WORKDIR \
          --out tests/validate/data/golden_reports_amx.json --validate-with OLD
  and the same with OMP_NUM_THREADS=2 --out tests/validate/data/golden_reports_amx_2threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# name -> (reference, artifact, validate keyword arguments)
CASES = {
    "fp8": ("tiny", "fp8", {"samples": 8, "seq_len": 128}),
    "nvfp4": ("tiny", "nvfp4", {"samples": 8, "seq_len": 128}),
    "nvfp4-kv": ("tiny", "nvfp4-kv", {"samples": 8, "seq_len": 128}),
    "mixed": ("tiny", "mixed", {"samples": 8, "seq_len": 128}),
    "nvfp4-positions": ("tiny", "nvfp4", {"samples": 2, "seq_len": 160, "positions": True}),
    "omni-mm": ("tiny-omni", "omni-mm", {"samples": 4, "seq_len": 128, "media_samples": 8, "max_ppl_ratio": 1.2}),
}
# Fields that are not results: timings and where the files were.
VOLATILE = ("seconds", "tokens_per_second", "reference", "candidate")


def make_artifacts(work: Path) -> dict[str, Path]:
    """The test artifacts under `work` (those already there are kept), each made in a child process that imports
    this tree's omniq whichever tree evaluates them."""
    from cli_subprocess import run_cli_in_subprocess  # tests/cli_subprocess.py
    from conftest import QUANTIZE_CALIB  # tests/conftest.py

    made = ("fp8", "nvfp4", "nvfp4-kv", "mixed")
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)         # inherited by both children below
    try:
        if not all((work / m).is_dir() for m in made):
            subprocess.run([sys.executable, str(HERE / "make_artifacts.py"), str(ROOT / "omniq" / "bundled" / "tiny"),
                            str(work), *made, "--rows", "4", "--seq", "128"], check=True)
        if not (work / "omni-mm").is_dir():
            r = run_cli_in_subprocess(["quantize", "tiny-omni", "--recipe", "omni-nvfp4", "--out",
                                       str(work / "omni-mm"), *QUANTIZE_CALIB], one_thread=True)
            assert r["rc"] == 0, r["stderr"][-2000:]
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return {m: work / m for m in (*made, "omni-mm")}


def strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in VOLATILE}


def floor_comparison(ref, rows):
    """The noise floor on token `rows` with whole-model forwards: `ref`'s float32 forward against the same
    weights run as a BF16 engine runs them (`artifact.bf16_compute_hooks`), BATCH_ROWS rows at a time; a
    `metrics.Comparison`. omniq's validate measures the floor layer-streamed (`stream.run`'s third stream);
    this loop is the independent whole-model reference the golden holds it to, and the floor the benchmarks
    print (benchmarks/nvfp4_quality.py), so it lives here rather than in omniq."""
    import torch

    from omniq.model import forward
    from omniq.validate.artifact import bf16_compute_hooks
    from omniq.validate.metrics import Comparison
    from omniq.validate.run import BATCH_ROWS

    linear, kv = bf16_compute_hooks(ref.weights)
    cmp = Comparison()
    with torch.inference_mode():
        for s in range(0, rows.shape[0], BATCH_ROWS):
            x, y = rows[s: s + BATCH_ROWS, :-1], rows[s: s + BATCH_ROWS, 1:]
            cmp.add(forward.logits(ref.arch, ref.weights, x),
                    forward.logits(ref.arch, ref.weights, x, linear=linear, kv=kv), y)
    return cmp


def noise_floor(reference: str, kw: dict) -> dict:
    """The reference run as a BF16 engine runs it (`artifact.bf16_compute_hooks`) against its float32 forward,
    on the rows validate evaluates (the text set; per media modality for an Omni reference, the towers in
    float32 for both), with the whole-model code: what the streamed validate's third stream must reproduce."""
    import torch

    from omniq.calib import media
    from omniq.model import forward, omni
    from omniq.validate import multimodal
    from omniq.validate.artifact import bf16_compute_hooks, read_artifact
    from omniq.validate.metrics import Comparison
    from omniq.validate.run import eval_texts, token_rows

    keys = ("kl_mean", "kl_p95", "top1_agreement", "ppl_ratio", "tokens")
    ref = read_artifact(reference)
    linear, kv = bf16_compute_hooks(ref.weights)
    rows = token_rows(ref.tokenizer, eval_texts(kw.get("eval_set"))[1], kw["samples"], kw["seq_len"])
    out = {"text": {k: floor_comparison(ref, rows).summary()[k] for k in keys}}
    with torch.inference_mode():
        if ref.checkpoint.is_omni:
            cfg = ref.checkpoint.config
            tokens = omni.context_tokens(cfg, ref.tokenizer)
            for m in multimodal.available(cfg, ref.checkpoint.headers)[0]:
                cmp = Comparison()
                for sample in media.bundled(m, "eval", kw["media_samples"]):
                    x = media.model_inputs(sample, cfg, ref.tokenizer, tokens)
                    e = omni.multimodal_embeds(cfg, ref.arch, ref.weights, x.input_ids, pixels=x.pixels,
                                               features=x.features, tokens=tokens)
                    sel = slice(x.target_start - 1, x.num_tokens - 1)
                    cmp.add(forward.logits(ref.arch, ref.weights, inputs_embeds=e)[:, sel],
                            forward.logits(ref.arch, ref.weights, inputs_embeds=e, linear=linear, kv=kv)[:, sel],
                            x.input_ids[:, x.target_start:])
                out[m] = {k: cmp.summary()[k] for k in keys}
    return out


def weights_sha256(path: Path) -> str:
    """One digest over an artifact's safetensors files (the golden holds only for the same artifact)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def record(paths: dict[str, Path], names=tuple(CASES)) -> dict:
    from omniq.validate.run import validate

    out = {"artifacts_sha256": {name: weights_sha256(p) for name, p in paths.items()}}
    for name in names:
        ref, art, kw = CASES[name]
        out[name] = strip(json.loads(json.dumps(validate(ref, paths[art], **kw), default=str)))
        out[name]["noise_floor_by_set"] = noise_floor(ref, kw)
        print(name, out[name]["kl_mean"], out[name]["noise_floor_by_set"], flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "data" / "golden_reports.json")
    ap.add_argument("--validate-with", type=Path, default=ROOT, metavar="TREE",
                    help="the checkout whose omniq computes the reports and noise floors (default: this one)")
    ap.add_argument("--cases", help="comma-separated names of CASES to record (default: all; a golden file "
                    "the tests read needs all)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    names = args.cases.split(",") if args.cases else list(CASES)
    if unknown := [n for n in names if n not in CASES]:
        ap.error(f"--cases: {', '.join(unknown)}: not in CASES ({', '.join(CASES)})")
    tree = args.validate_with.resolve()
    if not (tree / "omniq" / "validate" / "run.py").is_file():
        ap.error(f"{tree}: not an omniq checkout (no omniq/validate/run.py)")
    if args.out.exists() and not args.force:
        ap.error(f"{args.out}: exists; pass --force to re-record it")
    sys.path[:0] = [str(tree), str(ROOT / "tests")]
    args.work.mkdir(parents=True, exist_ok=True)
    paths = make_artifacts(args.work)
    import omniq

    assert Path(omniq.__file__).resolve().is_relative_to(tree), (omniq.__file__, tree)
    golden = record(paths, names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")
    tmp.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} (reports by {omniq.__file__})")


if __name__ == "__main__":
    main()
