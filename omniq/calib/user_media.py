"""Media a user has, for `--calib-media` (quantize) and `--eval-media` (validate) of an Omni checkpoint.

`load(spec)` reads one source into per-modality samples (`omniq.calib.media.MediaSample`):
- a folder: image files (.png / .jpg / .jpeg / .webp / .bmp through Pillow, .npy arrays) and audio files
  (.wav through the standard library; .flac / .ogg through soundfile, the `media` extra), resampled later to
  the tower's rate (`media.audio_clips`). Captions or prompts: a sidecar `prompts.jsonl` (`{"file", "prompt",
  "target"}` per line), else a `NAME.txt` next to `NAME.png` holding the caption; without either the
  modality's default prompt and no caption (fine for calibration; evaluation needs a caption to score).
- a `datasets` dataset saved with `save_to_disk` (a folder with `dataset_info.json` / `state.json`), or a
  hub dataset `NAME[:CONFIG]` (`datasets.load_dataset`; untested here: no hub access): rows with an image
  and/or audio column (datasets' `Image` / `Audio` features, or a column named image / audio), the caption
  from the first of caption, text, sentence, transcription, answer, the prompt from prompt or question.

Bad files or rows (unreadable, wrong shape, no audio, a sampling rate outside 8-192 kHz, no caption where one
is required) get one line each: skipped by default (`bad="skip"`, the lines are returned and recorded) or
refused (`bad="fail"`, the first one is the error). A source with no usable sample is an error (exit 2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omniq.calib import media
from omniq.errors import OmniqError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
MIN_RATE, MAX_RATE = 8_000, 192_000
CAPTION_COLUMNS = ("caption", "text", "sentence", "transcription", "answer")
PROMPT_COLUMNS = ("prompt", "question")
BAD_POLICIES = ("skip", "fail")


@dataclass
class MediaSource:
    spec: str
    kind: str                                             # "folder" or "dataset"
    samples: dict[str, list] = field(default_factory=dict)    # modality -> [MediaSample]
    skipped: list[str] = field(default_factory=list)          # one line per bad file / row

    def identity(self, modality: str) -> dict:
        chosen = self.samples.get(modality, [])
        h = hashlib.sha256()
        for s in chosen:
            h.update(s.media_sha256().encode())
            h.update(s.prompt.encode())
            h.update(s.target.encode())
        return {"source": self.spec, "kind": self.kind, "samples": len(chosen), "sha256": h.hexdigest(),
                "skipped": list(self.skipped)}


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a .wav (standard library, or soundfile for float WAV) or a
    .flac / .ogg file (soundfile)."""
    if path.suffix.lower() == ".wav":
        try:
            return media.read_wav(path)
        except OmniqError:
            try:
                import soundfile  # noqa: F401
            except ImportError:
                raise
    try:
        import soundfile
    except ImportError:
        raise OmniqError(f"{path}: reading {path.suffix} audio needs soundfile (pip install 'omniq[media]'); "
                         "or convert it to 16-bit PCM WAV") from None
    try:
        y, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile reports every broken file its own way
        raise OmniqError(f"{path}: not a readable audio file ({type(e).__name__}: {e})") from None
    if y.size == 0:
        raise OmniqError(f"{path}: the audio file holds no samples")
    return y.mean(axis=1).astype(np.float32), int(rate)


def check_rate(rate: int, where: str) -> None:
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise OmniqError(f"{where}: sampling rate {rate} Hz is outside the supported {MIN_RATE}-{MAX_RATE} Hz "
                         "(resampling to the tower's rate from there would lose or invent the speech band)")


def _default_prompt(modality: str) -> str:
    return (media.IMAGE_PROMPTS if modality == "image" else media.AUDIO_PROMPTS)[0]


def _file_sample(file: Path, prompt: str | None, target: str) -> "media.MediaSample":
    if not file.is_file():
        raise OmniqError(f"{file}: listed in {media.SIDECAR} but not in the folder")
    suffix = file.suffix.lower()
    if suffix not in media.IMAGE_SUFFIXES | AUDIO_SUFFIXES:
        raise OmniqError(f"{file}: not an image or audio file")
    if suffix in media.IMAGE_SUFFIXES:
        p = media._with_placeholder(prompt or _default_prompt("image"), "image")
        return media.MediaSample("image", p, target, image=media.read_image(file), source=str(file))
    y, rate = read_audio(file)
    check_rate(rate, str(file))
    if not np.isfinite(y).all():
        raise OmniqError(f"{file}: the audio holds NaN or infinite samples")
    p = media._with_placeholder(prompt or _default_prompt("audio"), "audio")
    return media.MediaSample("audio", p, target, wave=y, rate=rate, source=str(file))


def _folder_entries(root: Path) -> list[tuple[Path, str | None, str]]:
    sidecar = root / media.SIDECAR
    if sidecar.is_file():
        entries = []
        for n, line in enumerate(sidecar.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                entries.append((root / row["file"], row.get("prompt"), str(row.get("target") or "")))
            except (ValueError, KeyError, TypeError):
                raise OmniqError(f"{sidecar}:{n}: expected a JSON object with a \"file\" field") from None
        return entries
    out = []
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in media.IMAGE_SUFFIXES | AUDIO_SUFFIXES:
            cap = f.with_suffix(".txt")
            out.append((f, None, (" " + cap.read_text(encoding="utf-8").strip()) if cap.is_file() else ""))
    return out


def _dataset_columns(ds) -> tuple[str | None, str | None, str | None, str | None]:
    feats = getattr(ds, "features", None) or {}
    names = list(feats) if feats else list(getattr(ds, "column_names", []) or [])
    kind = {n: type(f).__name__ for n, f in dict(feats).items()}
    image = next((n for n in names if kind.get(n) == "Image"), "image" if "image" in names else None)
    audio = next((n for n in names if kind.get(n) == "Audio"), "audio" if "audio" in names else None)
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    prompt = next((c for c in PROMPT_COLUMNS if c in names), None)
    return image, audio, caption, prompt


def _open_dataset(spec: str, split: str):
    import datasets

    path = Path(spec).expanduser()
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise OmniqError(f"{spec}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        return ds
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - hub / builder errors come in many types
        raise OmniqError(f"{spec}: cannot load the dataset ({type(e).__name__}: {e})") from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                  "dataset_dict.json"))


def load(spec: str, *, bad: str = "skip", need_target: bool = False, split: str = "train",
         limit: int | None = None, what: str = "--calib-media") -> MediaSource:
    """Read a folder or dataset of media (see the module doc). `need_target`: a sample without a caption is
    bad (evaluation scores the caption). `limit`: stop after this many usable samples per modality."""
    if bad not in BAD_POLICIES:
        raise OmniqError(f"--bad-media {bad!r}: expected skip or fail")
    path = Path(spec).expanduser()
    src = MediaSource(spec=str(spec), kind="dataset" if (_is_saved_dataset(path) or not path.exists())
                      else "folder")

    def add(make, where: str):
        try:
            s = make()
            if need_target and not s.target.strip():
                raise OmniqError(f"{where}: no caption to score (give one in {media.SIDECAR}, a .txt beside "
                                 "the file or a caption column)")
        except OmniqError as e:
            if bad == "fail":
                raise OmniqError(f"{what} {spec}: {e} (--bad-media skip would skip it)") from None
            src.skipped.append(str(e))
            return
        got = src.samples.setdefault(s.modality, [])
        if limit is None or len(got) < limit:
            got.append(s)

    if src.kind == "folder":
        if not path.is_dir():
            raise OmniqError(f"{what} {spec}: not a folder or a dataset")
        for file, prompt, target in _folder_entries(path):
            add(lambda f=file, p=prompt, t=target: _file_sample(f, p, t), str(file))
    else:
        ds = _open_dataset(spec, split)
        image, audio, caption, prompt = _dataset_columns(ds)
        if image is None and audio is None:
            raise OmniqError(f"{what} {spec}: no image or audio column (columns: "
                             f"{', '.join(getattr(ds, 'column_names', []) or []) or 'none'})")
        for i, row in enumerate(ds):
            target = (" " + str(row.get(caption)).strip()) if caption and row.get(caption) else ""
            pr = str(row[prompt]) if prompt and row.get(prompt) else None
            at = f"{spec} row {i}"
            if image is not None and row.get(image) is not None:
                add(lambda v=row[image], p=pr, t=target, w=at: media.MediaSample(
                    "image", media._with_placeholder(p or _default_prompt("image"), "image"), t,
                    image=media._dataset_image(v, w), source=w), at)
            if audio is not None and row.get(audio) is not None:
                def make_audio(v=row[audio], p=pr, t=target, w=at):
                    y, r = media._dataset_audio(v, w, None)
                    check_rate(r, w)
                    return media.MediaSample("audio", media._with_placeholder(p or _default_prompt("audio"), "audio"),
                                             t, wave=y, rate=r, source=w)
                add(make_audio, at)
    if not any(src.samples.values()):
        first = f"; first problem: {src.skipped[0]}" if src.skipped else ""
        raise OmniqError(f"{what} {spec}: no usable image or audio sample ({len(src.skipped)} skipped{first})")
    return src
