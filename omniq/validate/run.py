"""`omniq validate REFERENCE CANDIDATE`: compare what ships with what it was made from, from the files.

Both checkpoints are opened by `artifact.read_artifact` and run side by side, one decoder layer at a time
(`omniq.validate.stream`: the candidate dequantized on use, its activations and KV cache quantized as an
engine would, next to the float32 reference and the reference as a BF16 engine runs it, the noise floor),
through the same forward (`omniq.model.forward`, whose Mamba-2 scan is right at any length) on held-out text: documents wrapped `<s> doc </s>`, tokenized
with the reference's tokenizer, concatenated and cut into rows of `seq_len` inputs (plus the next token as
the last target). The report's top-level keys are fixed: `kl_mean`, `kl_p95`, `top1_agreement`,
`ppl_reference`, `ppl_candidate`, `ppl_ratio`, `tokens`, `passed`; the rest (`gates`, `failures`, `format`,
`layers_sqnr`, `noise_floor`, ...) add detail. `--device cuda[:N]` runs the stream on a GPU (untested here:
no GPU in CI; the meta-device test checks that every tensor is made on the inputs' device).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import torch

from omniq.atomic import write_atomic
from omniq.calib import docstrings
from omniq.errors import OmniqError
from omniq.validate import binding, gates as gates_mod, generate as generate_mod
from omniq.validate import stream
from omniq.validate.artifact import Artifact, check_same_model, read_artifact
from omniq.validate.stream import BATCH_ROWS  # noqa: F401  (rows per batch; benchmarks import it here)

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256

Progress = Callable[[int, int], None]


# ----- evaluation text ------------------------------------------------------------------------------------
def eval_texts(eval_set: str | os.PathLike | None) -> tuple[str, list[str]]:
    """(label, documents): a bundled split name (`eval`, `eval2`, `calib`), a .jsonl file with a "text"
    field per line, or a text file whose documents are separated by blank lines."""
    if eval_set is None:
        eval_set = "eval"
    if str(eval_set) in docstrings.SPLITS and not Path(str(eval_set)).exists():
        if str(eval_set) == "train":
            raise OmniqError("--eval train: the bundled model was trained on it; use eval, eval2 or a file")
        return f"bundled:{eval_set}", list(docstrings.texts(str(eval_set)))
    path = Path(eval_set).expanduser()
    if not path.is_file():
        raise OmniqError(f"--eval {eval_set}: no such file and not a bundled set "
                         "(eval, eval2, calib); pass a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OmniqError(f"--eval {path}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise OmniqError(f"--eval {path}: line {i} is not a JSON object with a \"text\" field") from None
    else:
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    if not docs:
        raise OmniqError(f"--eval {path}: no text in it")
    return str(path), docs


def token_rows(tokenizer, docs: Iterable[str], samples: int, seq_len: int) -> torch.Tensor:
    """(rows, seq_len + 1) token ids: `<s> doc </s>` documents concatenated and cut into rows; row r holds
    inputs ids[r*L : r*L+L] and targets shifted by one."""
    if samples < 1 or seq_len < 2:
        raise OmniqError("--samples must be at least 1 and --seq-len at least 2")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    need = samples * seq_len + 1
    ids: list[int] = []
    for doc in docs:
        enc = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids += ([bos] if bos is not None else []) + enc + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    rows = min(samples, (len(ids) - 1) // seq_len)
    if rows < 1:
        raise OmniqError(f"evaluation text has {len(ids)} tokens, fewer than one row of --seq-len {seq_len}; "
                         "pass more text or a shorter --seq-len")
    t = torch.tensor(ids[: rows * seq_len + 1], dtype=torch.long)
    return torch.stack([t[r * seq_len: r * seq_len + seq_len + 1] for r in range(rows)])


MAX_CHAT_CONVERSATIONS = 20_000   # read at most this many conversations of a chat evaluation source


def chat_sets(tokenizer, eval_set, column: str, split: str, share: float, samples: int, seq_len: int
              ) -> tuple[dict[str, torch.Tensor], dict, dict[str, list[str]]]:
    """`--eval-format chat`: the source's conversations rendered through the reference's chat template,
    `share` of them with reasoning on (`omniq.calib.chat`), as token rows per split ({reasoning_on,
    reasoning_off}: `samples` rows shared between them in that proportion), the eval identity and the rendered
    prompts per split (for --generate)."""
    import itertools

    from omniq.calib import chat, data as calib_data

    if eval_set is None:
        raise OmniqError("--eval-format chat needs --eval: a .jsonl / .json / .parquet file or a hub dataset with "
                         "a column of conversations")
    where = f"--eval {eval_set}"
    state = chat.start(tokenizer, share, where, column)
    wanted = chat.split_counts(samples, share)
    try:
        convs, ident = calib_data.source_texts(str(eval_set), column=column, split=split, chat=True)
        docs, prompts = chat.split(itertools.islice(convs, MAX_CHAT_CONVERSATIONS), tokenizer, state, where)
    except OmniqError as e:   # the calibration readers' wording, for an evaluation source
        raise OmniqError(str(e).replace("calibration data ", "--eval ", 1).replace("--calib-column / ", "")) \
            from None
    rows = {}
    for name, n in wanted.items():
        if not n:
            continue
        if not docs[name]:
            raise OmniqError(f"{where}: no conversation is rendered with {name.replace('_', ' ')} "
                             f"({sum(state.counts.values())} conversations at --reasoning-share {share:g}); "
                             "pass more conversations or another share")
        rows[name] = token_rows(tokenizer, docs[name], n, seq_len)
    identity = {k: v for k, v in ident.items() if k not in ("kind",)}
    identity.update(state.identity(), rows_per_split={k: int(v.shape[0]) for k, v in rows.items()})
    return rows, identity, prompts


# ----- the comparison -------------------------------------------------------------------------------------
def text_items(rows: torch.Tensor, name: str = "text") -> list:
    """Stream items of a text set: batches of BATCH_ROWS rows, inputs ids[:, :-1], targets ids[:, 1:]."""
    return [stream.Item(name, rows[s: s + BATCH_ROWS, :-1], rows[s: s + BATCH_ROWS, 1:])
            for s in range(0, rows.shape[0], BATCH_ROWS)]


def torch_device(spec: str) -> torch.device:
    """`--device`: cpu, or cuda / cuda:N when CUDA has that device (exit 2 otherwise)."""
    spec = (spec or "cpu").strip()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise OmniqError(f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); pass --device cpu")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise OmniqError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    raise OmniqError(f"--device {spec}: expected cpu, cuda or cuda:N")


def generation_bytes(reference: Artifact, candidate: Artifact) -> int:
    """What `--generate` holds: both models' tensors in float32 at once (`generate.compare` decodes with
    whole-model forwards, not layer-streamed)."""
    return sum(4 * math.prod(a.logical_shape(n)) for a in (reference, candidate) for n in a.base_names)


def preflight(reference: Artifact, candidate: Artifact, tokens: int, device: torch.device,
              noise_floor: bool = True, batch_tokens: int | None = None, generate: int = 0) -> dict:
    """Refuse (exit 2) before reading any weight when the run cannot fit: the per-step estimate (largest
    layer of both artifacts, hidden states of every token, a logits chunk; `stream.estimate_bytes`) against
    the memory limit of this process (`omniq.memory_limit`: its cgroup, else MemAvailable), or the GPU's
    free memory with --device cuda."""
    from omniq import memory_limit

    est = stream.estimate_bytes(reference, candidate, tokens, noise_floor, batch_tokens)
    need = est["total_bytes"]
    have, source = memory_limit.available_bytes(), memory_limit.limit_source()
    if device.type == "cuda":
        have, source = torch.cuda.mem_get_info(device)[0], f"free memory of {device}"
    est.update(available_bytes=have, limit_source=source)
    if device.type in ("cpu", "cuda") and need > have:
        largest = est["largest_step_bytes"] / 2**30
        raise OmniqError(f"validate needs about {need / 2**30:.2f} GiB (largest layer of both checkpoints "
                         f"{largest:.2f} GiB, hidden states of {tokens} tokens "
                         f"{est['hidden_states_bytes'] / 2**30:.2f} GiB) but {have / 2**30:.2f} GiB is available "
                         f"({source}); pass fewer --samples / a shorter --seq-len"
                         + ("" if not noise_floor else " or --no-noise-floor") + ", or run where more memory is")
    if generate:
        gen = generation_bytes(reference, candidate)
        est["generation_bytes"] = gen
        if device.type in ("cpu", "cuda") and gen > have:
            raise OmniqError(f"--generate {generate} holds both models in float32 ({gen / 2**30:.2f} GiB; "
                             f"generation is not layer-streamed) but {have / 2**30:.2f} GiB is available "
                             f"({source}); drop --generate (the layer-streamed metrics need "
                             f"{need / 2**30:.2f} GiB) or run where more memory is")
    return est


def _finite(obj):
    """JSON has no infinities: an identical layer's SQNR becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the JSON report atomically (a temporary sibling renamed into place); over an existing file only
    with `force` (`binding.check_target` refused one up front; this catches one that appeared meanwhile)."""
    path = Path(path).expanduser()
    write_atomic(path, json.dumps(_finite(report), indent=2, allow_nan=False) + "\n", replace=force)
    return path


def _sqnr_by_role(reference: Artifact, sqnr: dict[str, float]) -> dict[str, dict]:
    by_role: dict[str, list[float]] = {}
    for name, db in sqnr.items():
        lin = reference.arch.linear_by_name.get(name)
        by_role.setdefault(lin.role if lin else "other", []).append(db)
    return {role: {"min": min(v), "median": statistics.median(v), "layers": len(v)} for role, v in by_role.items()}


METRIC_KEYS = gates_mod.METRIC_KEYS
NOISE_FLOOR_KEYS = ("kl_mean", "kl_p95", "top1_agreement", "ppl_ratio", "tokens")


def validate(reference, candidate, *, eval_set=None, samples: int = DEFAULT_SAMPLES,
             seq_len: int = DEFAULT_SEQ_LEN, max_kl: float | None = None, min_top1: float | None = None,
             max_ppl_ratio: float | None = None, report_path=None, positions: bool = False,
             progress: Progress | None = None, media_samples: int | None = None, device: str = "cpu",
             noise_floor: bool = True, eval_media: str | None = None, bad_media: str = "skip", gates_file=None,
             generate: int = 0, max_new_tokens: int = generate_mod.DEFAULT_MAX_NEW_TOKENS,
             eval_format: str = "text", reasoning_share: float | None = None, eval_column: str | None = None,
             eval_split: str = "train", force: bool = False, reference_cache=None) -> dict:
    """Read both checkpoints from their files, layer by layer, compare next-token distributions (and the
    reference's BF16-engine noise floor), apply the gates.

    The gates come from the noise floor measured on the same rows (`gates.from_floor`; `noise_floor=False`:
    the bundled model's constant floor), the `gates_file` (`gates.load_file`) and the flags, in that order.
    Returns the report (and writes it to `report_path` when given: over an existing file only with `force`,
    refused before anything runs); `report["passed"]` says whether every gate held. Raises OmniqError (exit 2) for input that cannot be compared or a run that cannot fit.
    `eval_format` "chat": the evaluation text is `eval_set`'s conversations rendered through the reference's
    chat template (`chat_sets`), scored and gated per reasoning split (`report["reasoning"]`) and together.
    `reference_cache`: a directory where the reference's streams are kept per reference, rows and code
    (`omniq.validate.reference_cache`): a later run with the same key runs only the candidate's stream."""
    from omniq.calib import chat
    from omniq.validate import multimodal

    t0 = time.perf_counter()
    dev = torch_device(device)
    cand_path = Path(candidate)
    binding.check_target(report_path, cand_path if cand_path.is_dir() else str(candidate), force=force)
    chat.check_format(eval_format, "--eval-format")
    share = chat.check_share(reasoning_share, eval_format)
    if eval_column is not None and eval_format != "chat":
        raise OmniqError("--eval-column applies to --eval-format chat (a text --eval is a .txt or a .jsonl with "
                         "a \"text\" field)")
    gfile = gates_mod.load_file(gates_file) if gates_file is not None else None
    flags = {"max_kl": max_kl, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio}
    ref = read_artifact(reference)
    cand = read_artifact(candidate)
    check_same_model(ref, cand)
    splits, chat_identity, chat_prompts, docs = {}, None, None, []
    if eval_format == "chat":
        splits, chat_identity, chat_prompts = chat_sets(ref.tokenizer, eval_set, eval_column or chat.COLUMN, eval_split,
                                                share, samples, seq_len)
        label = str(eval_set)
        rows = torch.cat(list(splits.values()))
        if generate:        # the first prompts of each split, `generate` shared between them as the rows are
            want = chat.split_counts(generate, share, "--generate")
            short = [s for s, k in want.items() if len(chat_prompts[s]) < k]
            if short:
                raise OmniqError(f"--generate {generate}: --eval {eval_set} has only {len(chat_prompts[short[0]])} "
                                 f"conversations with {short[0].replace('_', ' ')}; pass fewer prompts")
            chat_prompts = {s: chat_prompts[s][:k] for s, k in want.items() if k}
    else:
        label, docs = eval_texts(eval_set)
        rows = token_rows(ref.tokenizer, docs, samples, seq_len)
    n_media = multimodal.DEFAULT_MEDIA_SAMPLES if media_samples is None else media_samples
    modalities, mm_warnings = multimodal.wanted(ref, n_media)
    source, skipped = multimodal.user_source(ref, eval_media, n_media, bad_media)
    mm_warnings += skipped
    media_inputs = {m: multimodal.sample_inputs(ref, m, n_media, multimodal.own_source(source, m))
                    for m in modalities}
    tokens = rows.shape[0] * (rows.shape[1] - 1) + sum(x.num_tokens for v in media_inputs.values() for x in v)
    batch_tokens = max([BATCH_ROWS * (rows.shape[1] - 1)] + [x.num_tokens for v in media_inputs.values() for x in v])
    memory = preflight(ref, cand, tokens, dev, noise_floor, batch_tokens, generate)

    t_eval = time.perf_counter()
    items = [it for name, r in splits.items() for it in text_items(r, name)] if splits else text_items(rows)
    for m, inputs in media_inputs.items():
        items += multimodal.items(ref, cand, m, inputs, dev)
    kv_amax: dict = {}
    cache = None
    if reference_cache is not None:
        from omniq.validate import reference_cache as cache_mod

        cache = cache_mod.open_entry(reference_cache, ref, items, noise_floor=noise_floor, device=dev)
    outcome = stream.run(ref, cand, items, device=dev, noise_floor=noise_floor, progress=progress, kv_amax=kv_amax,
                         cache=cache)
    if splits:
        outcome.merge("text", list(splits))
    by_set, sqnr, changed = outcome.summary(positions)
    eval_seconds = time.perf_counter() - t_eval
    metrics = by_set["text"]["candidate"]
    floor = ({k: by_set["text"]["noise_floor"][k] for k in NOISE_FLOOR_KEYS} if noise_floor else None)
    fmt = gates_mod.gate_format(cand)

    def gate_of(modality: str, own: dict | None) -> gates_mod.Gates:
        used = own if modality == "text" else gates_mod.at_least(own, floor)   # media: never below text's
        return gates_mod.from_floor(used, fmt, gates_mod.overrides_for(gfile, fmt, modality, flags))

    gate = gate_of("text", floor)
    failures = gates_mod.check(metrics, gate)
    # Omni: image+text and audio+text evaluation sets, each with its own floor and gates (omniq.validate.multimodal)
    by_modality = {}
    for m in modalities:
        own = {k: by_set[m]["noise_floor"][k] for k in NOISE_FLOOR_KEYS} if noise_floor else None
        by_modality[m] = multimodal.modality_report(
            m, by_set[m]["candidate"], gate_of(m, own), n_media, noise_floor=own,
            source=multimodal.own_source(source, m), eval_media=eval_media)
    # --eval-format chat: each reasoning split gated on its own floor (never below the text set's), like a modality
    by_split = {}
    for name in splits:
        own = {k: by_set[name]["noise_floor"][k] for k in NOISE_FLOOR_KEYS} if noise_floor else None
        g = gates_mod.from_floor(gates_mod.at_least(own, floor), fmt,
                                 gates_mod.overrides_for(gfile, fmt, "text", flags))
        by_split[name] = gates_mod.section(name.replace("_", " "), by_set[name]["candidate"], own, g)
    if by_modality or by_split:
        failures = [f"text: {f}" for f in failures]
    text_failures = list(failures)
    layer_failures = gates_mod.check_layers(sqnr, {n: q.weight_format for n, q in cand.quantized.items()}, gate)
    layer_failures += gates_mod.check_kv(kv_amax, cand.kv_scales)
    failures += layer_failures
    for m in [*by_split.values(), *by_modality.values()]:
        failures += m["failures"]
    generation = None
    if generate:
        generation = generate_mod.compare(ref, cand, docs, generate, max_new_tokens,
                                          gates_mod.length_ratio_for(gfile, fmt), media=media_inputs,
                                          media_length_ratio={m: gates_mod.length_ratio_for(gfile, fmt, m)
                                                              for m in media_inputs},
                                          chat_prompts=chat_prompts, device=dev)
        failures += generation["failures"]
    warnings = ref.warnings + cand.warnings + mm_warnings + (cache.warnings if cache is not None else [])
    if changed:
        first = max(changed, key=changed.get)
        warnings.append(f"{len(changed)} unquantized tensors differ from the reference (largest: {first}, "
                        f"{changed[first]:.3g}); the metrics include their effect")
    report = {
        **{k: metrics[k] for k in METRIC_KEYS},
        "passed": not failures,
        "gates": gate.as_dict(),
        "noise_floor": floor,
        "gate_table": {"text": gates_mod.side_by_side(metrics, floor, gate),
                       **{m: v["gate_table"] for m, v in by_split.items()},
                       **{m: v["gate_table"] for m, v in by_modality.items()}},
        "gates_file": gfile,
        "failures": failures,
        "layer_failures": layer_failures,
        "format": cand.format,
        "gate_format": fmt,
        "kv_cache": cand.kv_cache,
        "layer_formats": cand.format_counts(),
        "reference": str(ref.path),
        "candidate": str(cand.path),
        "eval": {"set": label, "rows": int(rows.shape[0]), "seq_len": int(rows.shape[1] - 1),
                 **(chat_identity if chat_identity is not None else {"format": "text"})},
        "layers_sqnr": sqnr,
        "sqnr_by_role": _sqnr_by_role(ref, sqnr),
        "unquantized_changed": changed,
        "warnings": warnings,
        "device": str(dev),
        "memory": {k: int(v) if isinstance(v, (int, float)) else v for k, v in memory.items()},
        "seconds": round(time.perf_counter() - t0, 2),
        "tokens_per_second": round(metrics["tokens"] / eval_seconds, 1) if eval_seconds > 0 else None,
        binding.KEY: binding.for_validation(cand.path, ref.path),
    }
    if cache is not None:
        report["reference_cache"] = cache.record()
    if by_modality:
        text = {k: report[k] for k in METRIC_KEYS}
        report["modalities"] = {"text": {**text, "passed": not text_failures, "gates": gate.as_dict(),
                                         "noise_floor": floor, "failures": text_failures, "eval": report["eval"]},
                                **by_modality}
    if by_split:
        report["reasoning"] = {"share": share, "conversations": chat_identity["conversations"],
                               **{name[len("reasoning_"):]: v for name, v in by_split.items()}}
    if positions:
        report["positions"] = metrics["positions"]
    if generation is not None:
        report["generation"] = generation
    if report_path is not None:
        write_report(report, report_path, force=force)
    return report


# ----- the terminal ---------------------------------------------------------------------------------------
@contextmanager
def terminal_progress(enabled: bool):
    """A transient progress bar on stderr (yields the `progress` callback, or None when not enabled)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("evaluating rows", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def summary_table(report: dict):
    """A rich table of the metrics next to this run's noise floor and their gates, for the terminal."""
    from rich.table import Table

    ok, bad = "[green]pass[/green]", "[red]FAIL[/red]"
    g = report["gates"]
    table = Table(title=f"omniq validate: {report['format']} candidate"
                        f"{' + FP8 KV cache' if report.get('kv_cache') else ''}, {report['tokens']} tokens "
                        f"({report['eval']['set']}); gates: {g['source']} x{g.get('multiplier') or '?'}")
    table.add_column("metric")
    table.add_column("noise floor", justify="right")
    table.add_column("value", justify="right")
    table.add_column("gate", justify="right")
    table.add_column("", justify="center")
    shown = {"kl_mean": ("mean KL(ref || cand)", lambda v: f"{v:.3g}", "<= {:.3g}"),
             "top1_agreement": ("top-1 agreement", lambda v: f"{100 * v:.2f} %", ">= {:.2%}"),
             "ppl_ratio": ("perplexity ratio", lambda v: f"{v:.4f}", "<= {:.4f}")}
    for modality, rows in (report.get("gate_table") or {}).items():
        shown_set = (modality if modality == "text" else modality.replace("_", " ") if modality.startswith("reasoning_")
                     else f"{modality}+text")       # the media sets are captioned
        prefix = "" if modality == "text" and len(report["gate_table"]) == 1 else f"{shown_set}: "
        for r in rows:
            label, fmt, gate_fmt = shown[r["metric"]]
            table.add_row(prefix + label, "-" if r["floor"] is None else fmt(r["floor"]), fmt(r["value"]),
                          gate_fmt.format(r["gate"]), ok if r["passed"] else bad)
    table.add_row("p95 KL", "", f"{report['kl_p95']:.3g}", "", "")
    table.add_row("perplexity reference / candidate", "",
                  f"{report['ppl_reference']:.3f} / {report['ppl_candidate']:.3f}", "", "")
    for role, s in sorted(report.get("sqnr_by_role", {}).items()):
        fmt = lambda v: "inf" if v is None or v == math.inf else f"{v:.1f}"  # noqa: E731
        table.add_row(f"SQNR {role}, min / median dB", "", f"{fmt(s['min'])} / {fmt(s['median'])}", "", "")
    if report.get("layer_failures"):
        table.add_row("layers below their format's SQNR minimum", "", str(len(report["layer_failures"])),
                      "0", bad)
    gen = report.get("generation")
    if gen:
        for k in ("same_first_16", "same_first_64"):
            if gen.get(k) is not None:
                table.add_row(f"generation: {k.replace('_', ' ')} tokens", "", f"{100 * gen[k]:.0f} %", "", "")
        table.add_row("generation: EOS within budget, ref / cand", "",
                      f"{100 * gen['eos_rate_reference']:.0f} % / {100 * gen['eos_rate_candidate']:.0f} %", "", "")
        parts = [("", gen), *((f" (reasoning {k})", v) for k, v in (gen.get("reasoning") or {}).items()),
                 *((f" ({m}+text prompts)", v) for m, v in (gen.get("modalities") or {}).items())]
        for label, s in parts:
            g = s["gates"]
            table.add_row(f"generation{label}: mean length ratio", "", f"{s['length_ratio']:.3f}",
                          f"{g['min_length_ratio']:g}-{g['max_length_ratio']:g}",
                          ok if g["min_length_ratio"] <= s["length_ratio"] <= g["max_length_ratio"] else bad)
    for name, b in (report.get("positions") or {}).items():
        table.add_row(f"positions {name}: KL / top-1", "",
                      f"{b['kl_mean']:.3g} / {100 * b['top1_agreement']:.1f} %", "", "")
    return table
