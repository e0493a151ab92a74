"""`omniq publish ARTIFACT_DIR REF` / `omniq pull REF DIR`: pick the destination by the reference's scheme.

`oci://HOST[:PORT]/REPO:TAG` goes to `omniq.publish.oci` (the OCI distribution API over requests),
`hf://ORG/NAME[@REVISION]` to `omniq.publish.hub` (through huggingface_hub). Both refuse an artifact that did not pass lint and its gates
unless `allow_failed`, and never replace what a reference already holds unless `force`.
"""

from __future__ import annotations

from omniq.errors import OmniqError

SCHEMES = ("oci://", "hf://")


def publish(artifact_dir, ref: str, *, force: bool = False, allow_failed: bool = False, plain_http: bool = False,
            progress=None) -> dict:
    """Publish; returns a JSON-able record with at least `ref` (and `digest` for OCI, `commit_url` for hub)."""
    if ref.startswith("oci://"):
        from omniq.publish import oci

        return oci.push(artifact_dir, ref, force=force, allow_failed=allow_failed, plain_http=plain_http,
                        progress=progress).as_dict()
    if ref.startswith("hf://"):
        from omniq.publish import hub

        return hub.push(artifact_dir, ref, force=force, allow_failed=allow_failed)
    raise OmniqError(f"{ref}: unknown destination; expected oci://HOST[:PORT]/REPO:TAG or hf://ORG/NAME[@REVISION]")


def pull(ref: str, dest, *, force: bool = False, plain_http: bool = False, progress=None) -> dict:
    if ref.startswith("oci://"):
        from omniq.publish import oci

        return oci.pull(ref, dest, force=force, plain_http=plain_http, progress=progress).as_dict()
    if ref.startswith("hf://"):
        raise OmniqError(f"{ref}: pulling from the hub is `omniq` checkpoint resolution's job; pass the hub id "
                         "(ORG/NAME) where a checkpoint is expected")
    raise OmniqError(f"{ref}: unknown source; expected oci://HOST[:PORT]/REPO:TAG")
