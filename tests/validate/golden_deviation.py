"""How far this tree's (layer-streamed) validate is from the whole-model golden of this CPU, field by field.

    python tests/validate/golden_deviation.py WORKDIR [--golden FILE] [--cases NAME,...] [--out FILE]

WORKDIR holds the artifacts record_golden.py made (their digests are checked against the golden's). Runs
`validate` for every case of record_golden.CASES and prints, per case, the largest relative deviation of a float
field and every field off golden.py's tolerance; --out writes those rows (and the run's CPU kind) as JSON.
--golden: another golden file (default: the one golden.py picks for this CPU and thread count); --cases: only
those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--golden", type=Path)
    ap.add_argument("--cases", help="comma-separated names of record_golden.CASES (default: all)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out and args.out.exists() and not args.force:
        ap.error(f"{args.out}: exists; pass --force to replace it")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]
    import golden
    import torch
    from record_golden import CASES

    from omniq.validate.run import validate

    gold_file = args.golden or golden.golden_file()
    if gold_file is None:
        ap.error(f"no golden recorded for this CPU on {torch.get_num_threads()} threads; pass --golden")
    gold = json.loads(gold_file.read_text())
    names = args.cases.split(",") if args.cases else list(CASES)
    if unknown := [n for n in names if n not in CASES or n not in gold]:
        ap.error(f"--cases: {', '.join(unknown)}: not a case of record_golden.CASES held in {gold_file}")
    cases = {}
    for name in names:
        ref, art, kw = CASES[name]
        path = args.work / art
        if golden.weights_sha256(path) != gold["artifacts_sha256"][art]:
            ap.error(f"{path}: not the artifact {gold_file} was recorded on")
        rows = golden.comparison(name, validate(ref, path, **kw), gold)
        floats = [r for r in rows if r["rel"] is not None]
        worst = max(floats, key=lambda r: r["rel"])
        off = [r for r in rows if not r["ok"]]
        cases[name] = {"fields": len(rows), "floats": len(floats), "exact": sum(r["rel"] == 0 for r in floats),
                       "worst": worst, "off_tolerance": off}
        print(f"{name}: {len(off)} of {len(rows)} fields off tolerance; {cases[name]['exact']} of {len(floats)} "
              f"floats exact; largest relative deviation {worst['rel']:.3g} ({worst['field']})", flush=True)
        for r in off:
            print(f"  OFF {r['field']}: streamed {r['streamed']!r} golden {r['golden']!r} relative {r['rel']} "
                  f"tolerance {r['tol']}", flush=True)
    if args.out:
        where = gold_file.resolve()
        out = {"golden": str(where.relative_to(ROOT) if where.is_relative_to(ROOT) else where),
               "amx_bf16": golden.cpu_has_amx_bf16(), "threads": torch.get_num_threads(), "cases": cases}
        tmp = args.out.with_name(args.out.name + ".part")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
