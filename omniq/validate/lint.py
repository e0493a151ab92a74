"""`omniq lint`: is this ModelOpt-style checkpoint one a serving engine will load and run right?

Reads any unified HF checkpoint of a NemotronH (or Nemotron 3 Nano Omni) model, ours or downloaded, from
its files: the safetensors headers (names, dtypes, shapes) for almost everything, and the values of the
scale tensors only (finite, positive). Weights are never loaded. Checksums are computed only when the
checkpoint carries omniq's manifest (`omniq.json`).

Every problem becomes a `Finding` (id, severity, tensor or module, message, fix). The ids:

    declaration       no-declaration, nothing-quantized, not-quantized (info), declaration-conflict,
                      quant-algo-unsupported, kv-algo-unsupported, group-size
    names             exclude-unmatched (incl. ModelOpt 0.47's corrupted "\\u0000...pt_name_sentinel" names),
                      quantized-layers-unmatched
    layout            tensor-missing, tensor-unexpected, shape-mismatch, packed-shape
    declared vs disk  quantized-undeclared, declared-not-stored, format-mismatch, tower-not-excluded,
                      size-mismatch (the bytes of the linear weights against what the declared formats take)
    companions        companion-missing, companion-dtype, companion-shape, companion-orphan
    scale values      scale-nonfinite, scale-nonpositive
    KV cache          kv-scale-missing, kv-scale-undeclared
    must stay BF16    router-quantized, conv1d-quantized, norm-quantized, embedding-quantized,
                      tower-quantized, lm-head-quantized
    manifest          checksum-mismatch, checksum-file-missing, checksum-file-unlisted, manifest-unreadable
    engine            mamba-ssm-cache-dtype (TensorRT-LLM)

Engine facts (`engine` = "trtllm" | "vllm" | "sglang" | None for engine-neutral), from the engines' loaders:
- lm_head: TensorRT-LLM's PyTorch backend builds `lm_head` without a QuantConfig ("lm_head Linear will not
  accept QuantConfig"); vLLM's and SGLang's ModelOpt configs hand out quantized methods only to linear,
  fused-MoE and attention layers, and `lm_head` is a `ParallelLMHead` (an embedding): all three load it as
  BF16 and fail on (or silently misread) a quantized one. Error for any named engine, warning without one.
- pre-quantized KV cache: TensorRT-LLM accepts FP8 and NVFP4; vLLM's ModelOpt config and SGLang's accept
  FP8 only (conservative: what their ModelOpt loaders list). NVFP4 needs group_size 16 everywhere.
- quant_algo: lint understands FP8, NVFP4, W4A8_NVFP4_FP8, W4A16_NVFP4 and MIXED_PRECISION of them; vLLM and
  SGLang are held to FP8, NVFP4 and MIXED_PRECISION (assumption: the algorithms their ModelOpt loaders name).
- TensorRT-LLM keeps the Mamba SSM cache correct only in float32 (`mamba_ssm_cache_dtype`, issue #8763).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omniq.errors import OmniqError
from omniq.model import omni
from omniq.quant import formats as qformats
from omniq.model import names
from omniq.model.arch import Arch
from omniq.model.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from omniq.quant.plan import NVFP4_GROUP, weight_bytes
from omniq.validate import declaration as decl_mod
from omniq.validate.declaration import ALGO_FORMATS, MIXED, Declaration, Names
from omniq.validate.findings import Finding

ENGINES = ("trtllm", "vllm", "sglang")
ENGINE_NAMES = {"trtllm": "TensorRT-LLM", "vllm": "vLLM", "sglang": "SGLang"}
KNOWN_ALGOS = frozenset(ALGO_FORMATS) | {MIXED}
ENGINE_ALGOS = {
    None: KNOWN_ALGOS,
    "trtllm": KNOWN_ALGOS,
    "vllm": frozenset({"FP8", "NVFP4", MIXED}),
    "sglang": frozenset({"FP8", "NVFP4", MIXED}),
}
ENGINE_KV_ALGOS = {
    None: frozenset({"FP8", "NVFP4"}),
    "trtllm": frozenset({"FP8", "NVFP4"}),
    "vllm": frozenset({"FP8"}),
    "sglang": frozenset({"FP8"}),
}
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
STORED_FORMAT = {dtype: f.name for dtype, f in qformats.BY_WEIGHT_DTYPE.items()}   # weight dtype -> format
companion_of = qformats.companion_of     # `X.weight_scale` -> ("X", "weight_scale"); None for a base tensor
SIZE_TOLERANCE = 0.02       # relative difference between the bytes on disk and the declared formats' bytes

REEXPORT = "re-export the checkpoint with `omniq quantize`"


# ----- the checkpoint as lint sees it ---------------------------------------------------------------------
@dataclass
class Seen:
    ckpt: Checkpoint
    declarations: list[Declaration]
    engine: str | None

    @property
    def arch(self) -> Arch:
        return self.ckpt.arch

    @property
    def headers(self) -> dict[str, TensorInfo]:
        return self.ckpt.headers

    @property
    def declared(self) -> Declaration | None:
        """The declaration engines read first (hf_quant_config.json, else config.json's)."""
        return self.declarations[0] if self.declarations else None

    @cached_property
    def names(self) -> Names:
        return Names(list(self.headers), self.ckpt.is_omni)

    @cached_property
    def base_tensors(self) -> list[str]:
        return [n for n in self.headers if companion_of(n) is None]

    @cached_property
    def stored(self) -> dict[str, str]:
        """Every module with a `.weight` -> how it is stored: bf16 (any float), fp8, nvfp4, or the dtype."""
        out = {}
        for n in self.base_tensors:
            if n.endswith(".weight"):
                dtype = self.headers[n].dtype
                out[n[: -len(".weight")]] = "bf16" if dtype in FLOAT_DTYPES else STORED_FORMAT.get(dtype, dtype)
        return out

    @cached_property
    def excludes(self):
        d = self.declared
        return self.names.matcher(d.exclude_modules if d else ())

    @cached_property
    def quantized_layers(self) -> dict[str, object]:
        """MIXED_PRECISION: real module name -> its quantized_layers entry (names resolved like exclude names)."""
        d = self.declared
        out = {}
        for name, entry in (d.quantized_layers if d else {}).items():
            real = self.names.resolve(name)
            if real is not None:
                out[real] = entry
        return out

    @cached_property
    def lm_head(self) -> str:
        return self.arch.lm_head

    @cached_property
    def llm_linears(self) -> dict[str, object]:
        """The language model's linear layers an engine quantizes (every one but lm_head)."""
        return {lin.name: lin for lin in self.arch.linears if lin.role != "lm_head"}

    @cached_property
    def reading(self) -> decl_mod.Reading:
        return decl_mod.Reading(self.declarations, self.ckpt.is_omni, decl_mod.engine_linears(self.arch))

    def declared_algo(self, module: str) -> str | None:
        """The algorithm the declaration gives `module` (None: BF16), as engines read it (`Reading.algo`): a
        module outside the language model's linears counts as covered when stored quantized and not of a
        family that stays BF16."""
        covered = module in self.llm_linears or (module not in self.arch.linear_by_name and keep_bf16_family(
            self, module) is None and self.stored.get(module, "bf16") != "bf16")
        return self.reading.algo(module, covered=covered)

    def declared_format(self, module: str) -> str:
        return decl_mod.format_of(self.declared_algo(module))


def keep_bf16_family(seen: Seen, module: str) -> str | None:
    """Which part of the model that is never quantized a module belongs to (None: a quantizable one)."""
    comp = omni.component_of(module)
    if comp in omni.TOWER_PREFIXES:
        return "tower"
    if module == seen.lm_head:
        return "lm_head"
    t = seen.arch.tensor_by_name.get(f"{module}.weight")
    last = module.rsplit(".", 1)[-1]
    if (t is not None and t.component == "router") or names.is_router(module):
        return "router"
    if last == "conv1d":
        return "conv1d"
    if (t is not None and t.component == "norms") or "norm" in last:
        return "norm"
    if (t is not None and t.component == "embeddings") or last in ("embeddings", "embedding", "embed_tokens"):
        return "embedding"
    return None


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


# ----- checks --------------------------------------------------------------------------------------------
def check_declaration(seen: Seen) -> list[Finding]:
    out = []
    d = seen.declared
    quantized = sorted(m for m, f in seen.stored.items() if f != "bf16")
    if d is None or d.quant_algo is None:
        if quantized:
            where = "hf_quant_config.json and config.json" if d is None else d.source
            out.append(Finding("no-declaration", "error", quantized[0],
                               f"{len(quantized)} modules are stored quantized but {where} declare no quant_algo; "
                               "engines will load the checkpoint as BF16 and fail on the quantized tensors",
                               "write hf_quant_config.json (and config.json quantization_config) as ModelOpt's "
                               f"export does, or {REEXPORT}"))
        elif d is not None:
            out.append(Finding("nothing-quantized", "error", "",
                               f"{d.source} declares a quantization with quant_algo null and no tensor is "
                               "quantized: the recipe matched no layer (a known ModelOpt failure mode)",
                               "check the recipe's module names with `omniq plan`, then quantize again"))
        else:
            out.append(Finding("not-quantized", "info", "", "no quantization declared and no quantized tensor: "
                               "a plain BF16 checkpoint", "nothing to do"))
    elif d.quant_algo not in KNOWN_ALGOS:
        out.append(Finding("quant-algo-unsupported", "error", "",
                           f"{d.source} declares quant_algo {d.quant_algo!r}, which omniq lint cannot check "
                           f"(it checks {', '.join(sorted(KNOWN_ALGOS))})",
                           "use an FP8 / NVFP4 recipe, or check this checkpoint with its producer's tools"))
    elif d.quant_algo not in ENGINE_ALGOS[seen.engine]:
        out.append(Finding("quant-algo-unsupported", "error", "",
                           f"{ENGINE_NAMES[seen.engine]} does not load ModelOpt checkpoints with quant_algo "
                           f"{d.quant_algo!r} (it loads {', '.join(sorted(ENGINE_ALGOS[seen.engine]))})",
                           "serve it with TensorRT-LLM, or quantize with an FP8 / NVFP4 recipe"))
    if d is not None and d.is_mixed:
        bad: dict[str | None, list[str]] = {}
        for name, entry in d.quantized_layers.items():
            algo = d.layer_algo(entry)
            if algo not in ALGO_FORMATS or algo not in ENGINE_ALGOS[seen.engine]:
                bad.setdefault(algo, []).append(name)
        for algo, layers in bad.items():
            engine = ENGINE_NAMES.get(seen.engine, "omniq lint")
            out.append(Finding("quant-algo-unsupported", "error", layers[0],
                               f"quantized_layers gives {len(layers)} layers quant_algo {algo!r}, which {engine} "
                               "does not handle", "use FP8 or NVFP4 for these layers"))
    if d is not None:
        out += _check_kv_algo(seen, d)
        out += _check_group_size(d)
    for other in seen.declarations[1:]:
        out += _check_conflict(d, other)
    return out


def _check_kv_algo(seen: Seen, d: Declaration) -> list[Finding]:
    kv = d.kv_cache_quant_algo
    if kv is None or kv in ENGINE_KV_ALGOS[seen.engine]:
        return []
    who = ENGINE_NAMES.get(seen.engine, "TensorRT-LLM")
    accepted = ", ".join(sorted(ENGINE_KV_ALGOS[seen.engine]))
    return [Finding("kv-algo-unsupported", "error", "",
                    f"{d.source} declares kv_cache_quant_algo {kv!r}; {who} accepts only {accepted} KV caches "
                    "in pre-quantized checkpoints", "quantize the KV cache to FP8 (`--kv-cache fp8`) or not at all")]


def _check_group_size(d: Declaration) -> list[Finding]:
    out = []
    uses = []          # (name, group size) of every NVFP4 declaration
    if d.quant_algo in ALGO_FORMATS and ALGO_FORMATS[d.quant_algo][0] == "nvfp4":
        uses.append(("", d.group_size))
    if d.is_mixed:
        for name, entry in d.quantized_layers.items():
            algo = d.layer_algo(entry)
            if algo in ALGO_FORMATS and ALGO_FORMATS[algo][0] == "nvfp4":
                uses.append((name, d.layer_group_size(entry)))
    bad = [(n, g) for n, g in uses if g != NVFP4_GROUP]
    if bad:
        name, g = bad[0]
        what = "is missing" if g is None else f"is {g}"
        more = f" ({len(bad)} declarations)" if len(bad) > 1 else ""
        out.append(Finding("group-size", "error", name,
                           f"NVFP4 group_size {what}{more}; NVFP4 is defined with one scale per 16 elements and "
                           "TensorRT-LLM requires group_size 16", "declare group_size 16 (ModelOpt's NVFP4 configs "
                           "use block size 16)"))
    return out


def _check_conflict(a: Declaration, b: Declaration) -> list[Finding]:
    diffs = []
    for what, x, y in (("quant_algo", a.quant_algo, b.quant_algo),
                       ("kv cache", a.kv_cache_quant_algo, b.kv_cache_quant_algo),
                       ("group_size", a.group_size, b.group_size)):
        if x != y and not (what == "group_size" and (x is None or y is None)):
            diffs.append(f"{what} {x!r} vs {y!r}")
    if set(a.exclude_modules) != set(b.exclude_modules):
        only = sorted(set(a.exclude_modules) ^ set(b.exclude_modules))
        diffs.append(f"exclude lists differ ({len(only)} names, e.g. {only[0]!r})")
    qa = {k: a.layer_algo(v) for k, v in a.quantized_layers.items()}
    qb = {k: b.layer_algo(v) for k, v in b.quantized_layers.items()}
    if qa != qb:
        diffs.append("quantized_layers differ")
    if not diffs:
        return []
    return [Finding("declaration-conflict", "error", "",
                    f"{a.source} and {b.source} disagree: {'; '.join(diffs)}. TensorRT-LLM reads the first, "
                    "vLLM and SGLang the second, so they would load the checkpoint differently",
                    "write both from the same quantization dict (ModelOpt's convert_hf_quant_config_format)")]


def check_names(seen: Seen) -> list[Finding]:
    """Every exclude / ignore / quantized_layers name matches a real module or tensor."""
    out = []
    d = seen.declared
    if d is None:
        return out
    key = "ignore" if d.source == decl_mod.CONFIG_QUANT and "ignore" in d.raw else "exclude_modules"
    for name in d.exclude_modules:
        if not isinstance(name, str):
            out.append(Finding("exclude-unmatched", "error", repr(name), f"{key} holds a non-string entry {name!r}",
                               "list module names as strings"))
        elif decl_mod.is_corrupted(name):
            out.append(Finding("exclude-unmatched", "error", repr(name),
                               f"{key} entry {name!r} is corrupted (ModelOpt 0.47 rewrites its own name sentinel "
                               "when renaming model. -> backbone.) and matches no module; engines ignore it",
                               f"replace it with the module's real name (e.g. {name.split(chr(0))[0].rstrip('.')!r}), "
                               f"or {REEXPORT}, which writes the exclude list from the layer plan"))
        elif seen.names.resolve(name) is None:
            out.append(Finding("exclude-unmatched", "error", name,
                               f"{key} entry {name!r} matches no module or tensor of this checkpoint (tried the "
                               "backbone./model. and language_model. spellings); whatever it meant to keep in BF16 "
                               "is not covered", "fix the name to a real module name, or drop it"))
    for name in d.quantized_layers:
        if decl_mod.is_corrupted(name) or seen.names.resolve(name) is None:
            out.append(Finding("quantized-layers-unmatched", "error", repr(name) if "\x00" in name else name,
                               f"quantized_layers names {name!r}, which is no module of this checkpoint",
                               f"name real modules in quantized_layers, or {REEXPORT}"))
    return out


def check_layout(seen: Seen) -> list[Finding]:
    """The tensors the config implies are there with their shapes (quantized weights in their packed form)."""
    out = []
    arch, h = seen.arch, seen.headers
    for t in arch.tensors:
        info = h.get(t.name)
        if info is None:
            out.append(Finding("tensor-missing", "error", t.name, f"config.json implies {t.name} {list(t.shape)} but "
                               "the checkpoint has no such tensor", "config and weights do not match; re-export"))
            continue
        fmt = seen.stored.get(t.name[: -len(".weight")]) if t.name.endswith(".weight") else None
        if fmt == "nvfp4":
            o, i = t.shape[0], t.shape[-1]
            want = qformats.NVFP4.stored_shape(t.shape)
            if info.shape != want:
                out.append(Finding("packed-shape", "error", t.name,
                                   f"NVFP4 weight stored as {list(info.shape)}; the [{o}, {i}] weight packs two "
                                   f"E2M1 values per byte into {list(want)}",
                                   f"the weight is not packed NVFP4; {REEXPORT}"))
        elif info.shape != t.shape and fmt in (None, "bf16", "fp8"):
            out.append(Finding("shape-mismatch", "error", t.name,
                               f"stored as {list(info.shape)}, config.json implies {list(t.shape)}",
                               "config and weights do not match; re-export from the right source"))
    known = arch.tensor_by_name
    for n in seen.base_tensors:
        if n not in known and omni.component_of(n) not in omni.TOWER_PREFIXES:
            out.append(Finding("tensor-unexpected", "warning", n,
                               f"{n} ({seen.headers[n].dtype} {list(seen.headers[n].shape)}) is not part of the "
                               "NemotronH layout config.json describes; engines may refuse the unknown weight",
                               "remove it, or check that config.json is the model's own"))
    return out


def check_formats(seen: Seen) -> list[Finding]:
    """What the declaration says each module is, against how it is stored."""
    out = []
    d = seen.declared
    if d is None or d.quant_algo is None or d.quant_algo not in KNOWN_ALGOS:
        return out
    for m, stored in sorted(seen.stored.items()):
        family = keep_bf16_family(seen, m)
        if family is not None and (stored != "bf16" or m not in seen.quantized_layers):
            continue     # stored quantized: check_keep_bf16 says it more precisely; BF16: never declared quantized
        declared = seen.declared_format(m)
        if declared == stored:
            continue
        if declared == "bf16":
            why = (f"matches {seen.excludes.match(m)!r} in the exclude list" if seen.excludes.match(m)
                   else "is not in quantized_layers" if d.is_mixed else "is not a layer the declaration covers")
            out.append(Finding("quantized-undeclared", "error", m,
                               f"stored {stored} but {why}: engines build it as BF16 and cannot load the "
                               "quantized tensors", "make the declaration list it as quantized, or store it BF16"))
        elif stored == "bf16":
            out.append(Finding("declared-not-stored", "error", m,
                               f"declared {declared} ({seen.declared_algo(m)}) but stored BF16: engines allocate "
                               "quantized weights and fail to load (or misread) the BF16 tensor",
                               "add it to the exclude list (or drop it from quantized_layers), or quantize it"))
        else:
            out.append(Finding("format-mismatch", "error", m,
                               f"declared {declared} ({seen.declared_algo(m)}) but stored {stored}",
                               f"the declaration and the tensors disagree; {REEXPORT}"))
    if not d.is_mixed:
        out += _check_towers_excluded(seen)
    return out


def _check_towers_excluded(seen: Seen) -> list[Finding]:
    """With one quant_algo for the whole checkpoint, every tower linear must be in the exclude list."""
    out = []
    for comp, prefix in omni.TOWER_PREFIXES.items():
        loose = [n[: -len(".weight")] for n in seen.base_tensors
                 if n.startswith(prefix) and n.endswith(".weight") and len(seen.headers[n].shape) == 2
                 and seen.stored.get(n[: -len(".weight")]) == "bf16" and seen.excludes.match(n[: -len(".weight")])
                 is None]
        if loose:
            out.append(Finding("tower-not-excluded", "error", loose[0],
                               f"{len(loose)} BF16 {comp.replace('_', ' ')} weights are not in the exclude list of "
                               f"a {seen.declared.quant_algo} checkpoint: engines build those linears quantized "
                               "and fail on the BF16 tensors", f"add {prefix}* to exclude_modules / ignore"))
    return out


def check_companions(seen: Seen) -> list[Finding]:
    """Each quantized weight has its scales, with the right dtypes and shapes; no scale without one."""
    out = []
    h = seen.headers
    for m, fmt in sorted(seen.stored.items()):
        if fmt not in qformats.FORMATS or keep_bf16_family(seen, m) is not None:
            continue                       # never-quantized parts: check_keep_bf16 reports them
        w = h[f"{m}.weight"].shape
        algo = seen.declared_algo(m)
        needs_input = ALGO_FORMATS[algo][1] is not None if algo in ALGO_FORMATS else True
        logical = seen.arch.tensor_by_name.get(f"{m}.weight")
        in_features = logical.shape[-1] if logical is not None else (2 * w[-1] if w else 0)
        f = qformats.FORMATS[fmt]
        want = {c.suffix: (c.dtype, c.shape((*w[:-1], in_features)) or "scalar", c.of) for c in f.scales
                if needs_input or c.of != "input"}
        for suffix, (dtype, shape, of) in want.items():
            name = f"{m}.{suffix}"
            info = h.get(name)
            if info is None:
                out.append(Finding("companion-missing", "error", name,
                                   f"{fmt} weight {m}.weight has no {suffix}; engines cannot "
                                   f"{'dequantize the weight' if of == 'weight' else 'quantize its input'}",
                                   f"{REEXPORT} (an uncalibrated layer: make sure calibration reaches it)"))
                continue
            if info.dtype != dtype:
                out.append(Finding("companion-dtype", "error", name,
                                   f"{suffix} of a {fmt} weight is {info.dtype}; it must be {dtype}",
                                   f"{REEXPORT}; engines reinterpret the bytes as {dtype}"))
            ok = _numel(info.shape) == 1 if shape == "scalar" else info.shape == shape
            if not ok:
                want_s = "one value (per-tensor)" if shape == "scalar" else str(list(shape))
                out.append(Finding("companion-shape", "error", name,
                                   f"{suffix} of a {fmt} weight has shape {list(info.shape)}; expected {want_s}",
                                   REEXPORT))
    for n in h:
        c = companion_of(n)
        if c is None or c[1] in qformats.KV_SUFFIXES:
            continue
        m, suffix = c
        if seen.stored.get(m, "bf16") == "bf16":
            what = "is stored BF16" if m in seen.stored else "has no weight"
            out.append(Finding("companion-orphan", "error", n,
                               f"{suffix} belongs to {m}, which {what}: engines building it unquantized have no "
                               "parameter for it and refuse the checkpoint", "drop the scale, or quantize the layer"))
    return out


def check_kv(seen: Seen) -> list[Finding]:
    out = []
    d = seen.declared
    arch, h = seen.arch, seen.headers
    wanted = []
    for i in arch.attention_layers:
        wanted += list(names.kv_scales(f"{arch.layer_prefix(i)}.mixer").values())
    kv = d.kv_cache_quant_algo if d else None
    kv_dtype = qformats.KV_CACHE[0].dtype
    if kv:
        for name in wanted:
            info = h.get(name)
            if info is None:
                out.append(Finding("kv-scale-missing", "error", name,
                                   f"{d.source} declares a {kv} KV cache but {name} is missing: the engine runs "
                                   "this layer's cache with scale 1.0 (or refuses it)",
                                   f"calibrate with the KV-cache quantizers enabled; {REEXPORT}"))
            elif info.dtype != kv_dtype or _numel(info.shape) != 1:
                out.append(Finding("companion-dtype" if info.dtype != kv_dtype else "companion-shape", "error", name,
                                   f"KV scale is {info.dtype} {list(info.shape)}; it must be one {kv_dtype} value",
                                   REEXPORT))
    else:
        present = [n for n in h if companion_of(n) and companion_of(n)[1] in qformats.KV_SUFFIXES]
        if present:
            out.append(Finding("kv-scale-undeclared", "warning", present[0],
                               f"{len(present)} k_scale / v_scale tensors but no kv_cache_quant_algo: engines run a "
                               "BF16 KV cache and ignore them", "declare kv_cache_quant_algo FP8, or drop the scales"))
    return out


def check_keep_bf16(seen: Seen) -> list[Finding]:
    """Nothing in a tower or projector, the router, conv1d, norms or embeddings is quantized; lm_head only
    where the engine loads it."""
    out = []
    quantized = [n for n in seen.base_tensors if seen.headers[n].dtype not in FLOAT_DTYPES]
    for n in quantized:
        m = n.rpartition(".")[0]
        family = keep_bf16_family(seen, m)
        dtype = seen.headers[n].dtype
        if family == "tower" and dtype in ("I64", "I32") and not n.endswith(".weight"):
            continue      # integer buffers of the real towers (RADIO summary_idxs, BatchNorm num_batches_tracked)
        if family is None and not n.endswith(".weight"):
            out.append(Finding("quantized-undeclared", "error", n,
                               f"stored {dtype}, but only linear weights are ever quantized: engines load this "
                               "parameter in high precision", f"store it in its original dtype; {REEXPORT}"))
            continue
        if family == "lm_head":
            sev = "error" if seen.engine else "warning"
            who = ENGINE_NAMES[seen.engine] if seen.engine else "TensorRT-LLM, vLLM and SGLang"
            out.append(Finding("lm-head-quantized", sev, n,
                               f"lm_head is stored {dtype}: {who} build lm_head unquantized and cannot load a "
                               "quantized one", "keep lm_head BF16 (omniq recipes always do)"))
        elif family == "tower":
            comp = omni.component_of(n)
            out.append(Finding("tower-quantized", "error", n,
                               f"{comp.replace('_', ' ')} tensor stored {dtype}: towers and projectors stay BF16 "
                               "(quantized towers misread images and audio)",
                               f"keep {omni.TOWER_PREFIXES[comp]}* in BF16 and in the exclude list"))
        elif family is not None:
            what = {"router": "the MoE router (mixer.gate) picks experts and stays in its own precision",
                    "conv1d": "the Mamba conv1d is not a linear layer and stays BF16",
                    "norm": "norm weights stay in high precision",
                    "embedding": "the token embeddings stay BF16"}[family]
            out.append(Finding(f"{family.replace('_', '-')}-quantized", "error", n,
                               f"stored {dtype}: {what}; engines load it unquantized",
                               f"keep it out of the quantized layers; {REEXPORT}"))
    return out


def check_scale_values(seen: Seen) -> list[Finding]:
    """Load only the scale tensors and check every value is finite and positive."""
    from safetensors import safe_open

    out = []
    names = [n for n in seen.headers if (c := companion_of(n)) and c[1] in qformats.SCALE_SUFFIXES
             and seen.headers[n].dtype in FLOAT_DTYPES | {c.dtype for f in qformats.FORMATS.values() for c in f.scales}]
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(seen.headers[n].file, []).append(n)
    for f, in_file in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for n in sorted(in_file):
                v = sf.get_tensor(n)
                bad_nan, bad_sign, first = _bad_values(v)
                what = f"{v.numel()} values" if v.numel() > 1 else "value"
                if bad_nan:
                    out.append(Finding("scale-nonfinite", "error", n,
                                       f"{bad_nan} of {what} are NaN or infinite"
                                       if v.numel() > 1 else f"is {float(v.float())}",
                                       "the layer saw NaN / inf during calibration, or none of its inputs "
                                       f"(an expert no token reached); recalibrate, then {REEXPORT}"))
                if bad_sign:
                    out.append(Finding("scale-nonpositive", "error", n,
                                       f"{bad_sign} of {what} are zero or negative (e.g. {first})"
                                       if v.numel() > 1 else f"is {first}",
                                       "a zero scale is an uncalibrated quantizer (no tokens reached it); engines "
                                       f"reject it: recalibrate with more data or all-expert routing, then {REEXPORT}"))
    return out


def _bad_values(v) -> tuple[int, int, float | None]:
    """(non-finite count, finite-but-not-positive count, the first such value). Counted in numpy: torch's
    element-wise ops on many small tensors are slow on a busy CPU. FP8 block scales are tested on their bits:
    E4M3FN has no infinity, NaN is S.1111.111, the sign is the top bit, zero is 0x00 / 0x80."""
    import numpy as np
    import torch

    if v.dtype == torch.float8_e4m3fn:
        u = v.view(torch.uint8).numpy().ravel()
        nan = (u & 0x7F) == 0x7F
        nonpos = ~nan & ((u >= 0x80) | (u == 0))
    else:
        a = v.to(torch.float32).numpy().ravel()
        nan = ~np.isfinite(a)
        nonpos = ~nan & (a <= 0)
    n_nonpos = int(np.count_nonzero(nonpos))
    first = float(v.reshape(-1)[int(np.argmax(nonpos))].float()) if n_nonpos else None
    return int(np.count_nonzero(nan)), n_nonpos, first


def check_size(seen: Seen) -> list[Finding]:
    """The linear weights on disk weigh what the declared formats say (an "NVFP4" checkpoint at BF16 size
    is not NVFP4)."""
    d = seen.declared
    if d is None or d.quant_algo is None or d.quant_algo not in KNOWN_ALGOS:
        return []
    h = seen.headers
    predicted: dict[str, int] = {}
    actual: dict[str, int] = {}
    for name, lin in seen.llm_linears.items():
        if f"{name}.weight" not in h:
            continue
        fmt = seen.declared_format(name)
        if fmt != "bf16" and fmt not in qformats.FORMATS:
            continue
        predicted[fmt] = predicted.get(fmt, 0) + weight_bytes(fmt, lin.out_features, lin.in_features)
        on_disk = sum(h[f"{name}.{s}"].nbytes for s in ("weight", *qformats.WEIGHT_COMPANIONS) if f"{name}.{s}" in h)
        actual[fmt] = actual.get(fmt, 0) + on_disk
    want, got = sum(predicted.values()), sum(actual.values())
    if want == 0 or abs(got - want) <= SIZE_TOLERANCE * want:
        return []
    split = ", ".join(f"{fmt}: {_gib(actual[fmt])} on disk vs {_gib(predicted[fmt])}" for fmt in sorted(predicted))
    return [Finding("size-mismatch", "error", "",
                    f"the language model's linear weights take {_gib(got)} on disk but the declared "
                    f"{d.quant_algo} formats take {_gib(want)} ({got / want:.2f}x; {split}): the declared "
                    "format is not what is stored", f"the export did not quantize what it declares; {REEXPORT}")]


def check_checksums(seen: Seen) -> list[Finding]:
    """Every file omniq.json lists has its sha256; no other file was added (sidecars aside)."""
    from omniq import manifest as mf
    from omniq.checksums import sha256_file

    root = seen.ckpt.path
    path = root / mf.MANIFEST
    if not path.is_file():
        return []
    try:
        listed = mf.listed_files(mf.read_manifest(path))
    except OmniqError as e:
        return [Finding("manifest-unreadable", "error", mf.MANIFEST, str(e).replace(f"{path}: ", ""),
                        f"{REEXPORT}, or delete omniq.json if the files were changed on purpose")]
    out = []
    for rel, digest in sorted(listed.items()):
        f = root / rel
        if not f.is_file():
            out.append(Finding("checksum-file-missing", "error", rel, "listed in omniq.json but not in the "
                               "checkpoint directory", "copy the file again (incomplete download or copy?)"))
        elif sha256_file(f) != digest:
            out.append(Finding("checksum-mismatch", "error", rel,
                               "sha256 differs from omniq.json: the file changed after quantize wrote it",
                               "re-download / re-copy it; if it was edited on purpose, quantize again"))
    skip = {mf.MANIFEST, *mf.SIDECARS}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel not in listed and rel not in skip and not rel.startswith("."):
            out.append(Finding("checksum-file-unlisted", "warning", rel,
                               "not listed in omniq.json: added after quantize wrote the artifact (omniq publish "
                               "refuses it)", "remove it, or quantize again if it belongs to the artifact"))
    return out


def check_engine(seen: Seen) -> list[Finding]:
    if seen.engine != "trtllm":
        return []
    cfg = seen.ckpt.llm_config
    v = cfg.get("mamba_ssm_cache_dtype")
    if v is None:
        return [Finding("mamba-ssm-cache-dtype", "info", "config.json",
                        "no mamba_ssm_cache_dtype in config.json; TensorRT-LLM keeps Mamba state correct only in "
                        "float32", "serve with kv_cache_config.mamba_ssm_cache_dtype: float32 (omniq build sets it)")]
    if str(v).lower() not in ("float32", "fp32"):
        return [Finding("mamba-ssm-cache-dtype", "warning", "config.json",
                        f"mamba_ssm_cache_dtype is {v!r}; TensorRT-LLM keeps Mamba state correct only in float32 "
                        "(issue #8763)", "set mamba_ssm_cache_dtype to float32 in config.json and the LLM-API "
                        "options")]
    return []


CHECKS = (check_declaration, check_names, check_layout, check_formats, check_companions, check_kv,
          check_keep_bf16, check_scale_values, check_size, check_checksums, check_engine)


def lint(path, engine: str | None = None, *, checksums: bool = True) -> list[Finding]:
    """Every finding about the checkpoint at `path` (a directory or bundled name) for `engine`."""
    if engine is not None and engine not in ENGINES:
        raise OmniqError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    ckpt = open_checkpoint(str(path), check_shapes=False)
    try:
        declarations = decl_mod.read(ckpt.path, ckpt.config)
    except ValueError as e:
        raise OmniqError(f"{e}; fix or re-export the file") from None
    seen = Seen(ckpt, declarations, engine)
    findings: list[Finding] = []
    for check in CHECKS:
        if check is check_checksums and not checksums:
            continue
        findings += check(seen)
    return findings


def report(found: list[Finding], path, engine: str | None) -> dict:
    """lint.json: the findings (`findings.as_json`) bound to the artifact they judge (`binding`)."""
    from omniq.validate import binding
    from omniq.validate import findings as fnd

    return {**fnd.as_json(found, path=str(path), engine=engine), binding.KEY: binding.for_lint(path)}
