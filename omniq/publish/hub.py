"""Publish an artifact to the Hugging Face Hub: `hf://ORG/NAME[@REVISION]`, through `upload_folder`.

`plan` decides everything offline: the repository, the branch, the files (the artifact's, checked against
`omniq.json`, plus a generated model card as README.md unless the artifact has its own), the commit
message. `stage` lays them out in a temporary folder (symlinks to the artifact's files and the card), and
`upload` is the one call that talks to the hub: create the repository and branch if missing, refuse a
revision that already holds an omniq artifact unless `--force`, `upload_folder`. The hub token comes from
huggingface_hub's usual places (`HF_TOKEN`, `hf auth login`) and never appears in a message; `HF_ENDPOINT`
points it at another hub.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omniq.errors import OmniqError
from omniq.publish import model_card
from omniq.publish import release as rel

SCHEME = "hf://"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision != "main" else "")


def parse_ref(ref: str) -> HubRef:
    usage = "expected hf://ORG/NAME or hf://ORG/NAME@REVISION"
    if not ref.startswith(SCHEME):
        raise OmniqError(f"{ref}: not a hub reference; {usage}")
    body, _, revision = ref[len(SCHEME):].partition("@")
    parts = body.split("/")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts) or ".." in body:
        raise OmniqError(f"{ref}: {usage} (letters, digits, . _ -)")
    if "@" in ref and (not revision or not _REV.match(revision) or ".." in revision):
        raise OmniqError(f"{ref}: revision {revision!r} is not a valid branch name; {usage}")
    return HubRef(body, revision or "main")


@dataclass
class UploadPlan:
    ref: HubRef
    artifact: Path
    files: list[str]                     # as they will be in the repository, README.md included
    commit_message: str
    commit_description: str
    card: str | None                     # generated README.md (None: the artifact's own is used)
    waived: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"repo_id": self.ref.repo_id, "revision": self.ref.revision, "files": self.files,
                "commit_message": self.commit_message, "generated_card": self.card is not None,
                "waived": self.waived}


def plan(artifact_dir, ref: str, *, allow_failed: bool = False) -> UploadPlan:
    target = parse_ref(ref)
    release = rel.open_release(artifact_dir)
    waived = rel.check_publishable(release, allow_failed)
    rel.digests(release)
    card = None if rel.CARD in release.sidecars else model_card.render(release, target.repo_id)
    files = sorted(set(release.files) | {rel.CARD})
    meta = rel.metadata(release)
    d = meta["deltas"]
    summary = ", ".join(f"{k} {d[k]:.4g}" for k in ("kl_mean", "top1_agreement", "ppl_ratio") if k in d)
    message = f"omniq: {rel.recipe_name(release)} artifact" + (f" ({summary})" if summary else "")
    description = (f"omniq.json sha256 {rel.sha256_file(release.path / rel.MANIFEST)}; gates "
                   + ("passed" if not waived else "NOT passed, published with --allow-failed: " + "; ".join(waived)))
    return UploadPlan(target, release.path, files, message, description, card, waived)


def stage(p: UploadPlan, into: Path) -> Path:
    """The folder upload_folder sends: symlinks to the artifact's files, plus the generated card."""
    for f in p.files:
        dst = into / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f == rel.CARD and p.card is not None:
            dst.write_text(p.card, encoding="utf-8")
        else:
            os.symlink((p.artifact / f).resolve(), dst)
    return into


def upload(p: UploadPlan, folder: Path, *, force: bool = False) -> str:
    """The only call that talks to the hub; returns the commit URL."""
    from huggingface_hub import HfApi

    token_value = os.environ.get("HF_TOKEN") or ""
    try:
        api = HfApi()
        api.create_repo(p.ref.repo_id, repo_type="model", exist_ok=True)
        if p.ref.revision != "main":
            api.create_branch(p.ref.repo_id, branch=p.ref.revision, exist_ok=True)
        if not force and api.file_exists(p.ref.repo_id, rel.MANIFEST, revision=p.ref.revision):
            raise OmniqError(f"{p.ref} already holds an omniq artifact; pass --force to commit over it")
        info = api.upload_folder(repo_id=p.ref.repo_id, folder_path=folder, revision=p.ref.revision,
                                 commit_message=p.commit_message, commit_description=p.commit_description)
    except OmniqError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth, quota: all fixable by the user, one line each
        first = (str(e).splitlines() or [""])[0]
        if token_value:
            first = first.replace(token_value, "***")
        raise OmniqError(f"{p.ref}: the hub upload failed ({type(e).__name__}: {first[:300]}); check the "
                         "network, HF_ENDPOINT and HF_TOKEN (write access to the repository)") from None
    return str(getattr(info, "commit_url", info))


def push(artifact_dir, ref: str, *, force: bool = False, allow_failed: bool = False) -> dict:
    p = plan(artifact_dir, ref, allow_failed=allow_failed)
    with tempfile.TemporaryDirectory(prefix="omniq-hub-") as tmp:
        url = upload(p, stage(p, Path(tmp)), force=force)
    return {**p.as_dict(), "ref": str(p.ref), "commit_url": url}
