"""Publish an artifact to an OCI registry and pull it back: `oci://HOST[:PORT]/REPO:TAG`, over the OCI
distribution API with plain `requests` (`Registry`).

The artifact becomes one OCI image manifest (artifactType `application/vnd.omniq.checkpoint.v1`):

- every file is a layer with an omniq media type (`MEDIA_TYPES`) and its relative path as
  `org.opencontainers.image.title`;
- the config blob is the artifact's metadata as JSON (recipe, per-format layer counts, measured deltas,
  gate results, source and hashes, calibration, versions); the same data, as strings, are the manifest's
  `vnd.omniq.*` annotations, so `oras manifest fetch` / a registry UI shows them without a download.

Order makes interruption safe: every blob is uploaded first (a blob the registry already holds is skipped,
so re-running an interrupted push resumes it), the manifest, which moves the tag, goes last. A push that
dies at any point leaves the tag where it was (absent, or the previous manifest). The tag is checked before
anything is uploaded and never moved without `--force` (a push racing another push to the same tag between
that check and the manifest upload is not detected: the registry has no conditional PUT). After the push
the manifest is read back by tag: its digest must be the one pushed and every layer's digest must be the
file's sha256 in `omniq.json`.

Publishing the same artifact (same omniq.json, same layers) to a tag that already holds it is a no-op that
succeeds, so a re-run pipeline or CI job does not need `--force`.

`pull` downloads every layer into a temporary sibling of DIR, checks each against its digest and size and
then every file against `omniq.json`, and only then renames it into place.

Transport: HTTPS, or plain HTTP with `--plain-http` and always for loopback hosts (127.0.0.1, localhost,
::1). One request at a time with timeouts and no retry loop (a registry that is down is reported at once). Credentials: `omniq.publish.registry_auth`; none appears in any output.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from omniq import __version__
from omniq.atomic import staged_dir
from omniq.errors import OmniqError
from omniq.publish import release as rel
from omniq.publish.registry_auth import Credentials, credentials_for

SCHEME = "oci://"
ARTIFACT_TYPE = "application/vnd.omniq.checkpoint.v1"
CONFIG_MEDIA_TYPE = "application/vnd.omniq.checkpoint.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
ANN = "vnd.omniq."
# (how the relative path ends, media type): first match wins.
MEDIA_TYPES = (
    (rel.MANIFEST, "application/vnd.omniq.manifest+json"),
    (rel.VALIDATION, "application/vnd.omniq.validation+json"),
    (rel.LINT, "application/vnd.omniq.lint+json"),
    (rel.EVAL, "application/vnd.omniq.eval+json"),
    (rel.CARD, "application/vnd.omniq.model-card+markdown"),
    ("hf_quant_config.json", "application/vnd.omniq.quant-config+json"),
    ("generation_config.json", "application/vnd.omniq.generation-config+json"),
    (".safetensors.index.json", "application/vnd.omniq.safetensors-index+json"),
    (".safetensors", "application/vnd.omniq.safetensors"),
    ("config.json", "application/vnd.omniq.config+json"),
    ("tokenizer.json", "application/vnd.omniq.tokenizer+json"),
    ("tokenizer_config.json", "application/vnd.omniq.tokenizer+json"),
    ("special_tokens_map.json", "application/vnd.omniq.tokenizer+json"),
    (".model", "application/vnd.omniq.tokenizer"),
    (".json", "application/vnd.omniq.file+json"),
    (".onnx", "application/vnd.omniq.onnx"),
    ("", "application/vnd.omniq.file"),
)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def media_type(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for end, mt in MEDIA_TYPES:
        if name == end or (end.startswith(".") and name.endswith(end)) or end == "":
            return mt
    raise AssertionError("MEDIA_TYPES ends with a catch-all")


# ----- references ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OciRef:
    host: str                   # host[:port]
    repo: str
    tag: str | None = None
    digest: str | None = None   # sha256:... (pull by digest)

    @property
    def reference(self) -> str:
        return self.digest or self.tag

    @property
    def loopback(self) -> bool:
        return self.host.rsplit(":", 1)[0] in LOOPBACK or self.host in LOOPBACK

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}/{self.repo}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


def parse_ref(ref: str, *, need_tag: bool = False) -> OciRef:
    """`oci://HOST[:PORT]/REPO:TAG` (or `@sha256:...` where a digest will do)."""
    usage = "expected oci://HOST[:PORT]/REPO:TAG, e.g. oci://127.0.0.1:5000/omniq/nano-nvfp4:v1"
    if not ref.startswith(SCHEME):
        raise OmniqError(f"{ref}: not an OCI reference; {usage}")
    rest = ref[len(SCHEME):]
    host, sep, path = rest.partition("/")
    if not sep or not host or not path or not _HOST_RE.match(host):
        raise OmniqError(f"{ref}: no registry host or repository; {usage}")
    tag = digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST_RE.match(digest):
            raise OmniqError(f"{ref}: digest {digest!r} is not sha256:<64 hex>; {usage}")
        if need_tag:
            raise OmniqError(f"{ref}: publishing needs a tag, not a digest; {usage}")
    else:
        path, sep, tag = path.rpartition(":") if ":" in path else (path, "", "")
        if not tag:
            raise OmniqError(f"{ref}: no tag; {usage}")
        if not _TAG_RE.match(tag):
            raise OmniqError(f"{ref}: tag {tag!r} is not a valid OCI tag (letters, digits, . _ -, at most 128)")
    if not _REPO_RE.match(path):
        raise OmniqError(f"{ref}: repository {path!r} is not valid (lowercase letters, digits, . _ - and /)")
    return OciRef(host, path, tag or None, digest)


# ----- the connection ------------------------------------------------------------------------------------
def _error_detail(resp) -> str:
    """The registry's own error message (OCI error JSON), else the HTTP reason."""
    try:
        errs = resp.json().get("errors") or []
        msgs = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs if isinstance(e, dict)]
        if msgs:
            return "; ".join(msgs)
    except Exception:  # noqa: BLE001 - not JSON: fall back to the reason
        pass
    return f"HTTP {resp.status_code} {resp.reason or ''}".strip()


class Registry:
    """One registry host and repository, spoken to with plain `requests` as the OCI distribution spec says.

    The calls: `GET /v2/` (is it a registry, which auth), `HEAD` / `GET /v2/REPO/blobs/DIGEST`, a monolithic
    upload (`POST /v2/REPO/blobs/uploads/`, then one `PUT LOCATION?digest=...` with the bytes), and
    `PUT` / `GET /v2/REPO/manifests/REF`. Authentication: none, HTTP basic (a `Basic` challenge on `/v2/`),
    or the token flow (a `Bearer realm=...,service=...,scope=...` challenge on any call: a token is fetched
    from the realm with the basic credentials, if any, and the call is repeated once with it). oras'
    client was used before; it offers no public way to turn off its minutes-long retry loop or to send a
    streamed file as one PUT, and this is the handful of calls omniq needs.
    """

    def __init__(self, ref: OciRef, *, plain_http: bool = False, credentials: Credentials | None = None):
        import requests

        self.ref = ref
        self.credentials = credentials
        self.insecure = plain_http or ref.loopback
        self._requests = requests
        self.session = requests.Session()
        self.token: str | None = None

    @property
    def root(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.ref.host}/v2"

    @property
    def base(self) -> str:
        return f"{self.root}/{self.ref.repo}"

    def redact(self, text: str) -> str:
        return self.credentials.redact(text) if self.credentials else text

    def _send(self, method: str, url: str, headers: dict | None = None, **kwargs):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT, READ_TIMEOUT))
        return self.session.request(method, url, headers=headers, allow_redirects=True, **kwargs)

    def request(self, method: str, url: str, *, during: str, **kwargs):
        """One HTTP call (repeated once after a bearer challenge, with a fresh token for its scope); a
        transport failure becomes a one-line OmniqError naming what was under way."""
        try:
            resp = self._send(method, url, **kwargs)
            challenge = _challenge(resp)
            if resp.status_code == 401 and challenge is not None and challenge[0] == "bearer":
                self.token = self._fetch_token(challenge[1], during)
                data = kwargs.get("data")
                if hasattr(data, "seek"):
                    data.seek(0)
                resp = self._send(method, url, **kwargs)
            return resp
        except self._requests.exceptions.SSLError as e:
            raise OmniqError(self.redact(
                f"registry {self.ref.host}: TLS failed while {during} ({type(e).__name__}); for a registry "
                "without TLS pass --plain-http")) from None
        except (self._requests.exceptions.ConnectionError, self._requests.exceptions.Timeout) as e:
            raise OmniqError(self.redact(
                f"registry {self.ref.host} is not reachable while {during} ({_reason(e)}); check the address "
                "and that the registry is running")) from None

    def _fetch_token(self, params: dict, during: str) -> str:
        """The token flow: GET realm?service=...&scope=... with basic credentials (or anonymously)."""
        realm = params.get("realm")
        if not realm:
            raise OmniqError(f"registry {self.ref.host} asked for a bearer token without a realm while {during}")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        resp = self.session.get(realm, params=query, auth=auth, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        if resp.status_code != 200:
            raise self.fail(resp, f"{during} (token from {realm.split('?', 1)[0]})")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise OmniqError(f"registry {self.ref.host}: the token service {realm.split('?', 1)[0]} sent no "
                             f"token while {during}")
        return token

    def fail(self, resp, during: str) -> OmniqError:
        if resp.status_code in (401, 403):
            who = (f"the credentials from {self.credentials.source}" if self.credentials
                   else "anonymous access (set OMNIQ_REGISTRY_USER and OMNIQ_REGISTRY_PASSWORD, or docker login)")
            return OmniqError(self.redact(f"registry {self.ref.host} refused {who} while {during} "
                                          f"({_error_detail(resp)})"))
        return OmniqError(self.redact(f"registry {self.ref.host} answered {_error_detail(resp)} while {during}"))

    def ping(self) -> None:
        """GET /v2/: is it an OCI registry, and which authentication does it want?"""
        url = f"{self.root}/"
        resp = self.request("GET", url, during="connecting")
        if resp.status_code == 200:
            return
        challenge = _challenge(resp)
        if resp.status_code == 401 and challenge is not None and challenge[0] == "basic":
            if self.credentials is None:
                raise self.fail(resp, "connecting")
            self.session.auth = (self.credentials.username, self.credentials.password)
            resp = self.request("GET", url, during="logging in")
            if resp.status_code == 200:
                return
        raise self.fail(resp, "connecting") if resp.status_code in (401, 403) else OmniqError(
            f"{self.ref.host} does not look like an OCI registry: GET /v2/ answered {_error_detail(resp)}")

    def manifest(self, reference: str) -> tuple[bytes, str] | None:
        """(raw bytes, digest) of the manifest at a tag or digest, None when there is none."""
        resp = self.request("GET", f"{self.base}/manifests/{reference}", during="reading the manifest",
                            headers={"Accept": MANIFEST_MEDIA_TYPE})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self.fail(resp, f"reading manifest {reference}")
        body = resp.content
        return body, "sha256:" + hashlib.sha256(body).hexdigest()

    def has_blob(self, digest: str) -> bool:
        resp = self.request("HEAD", f"{self.base}/blobs/{digest}", during="checking a blob", headers={})
        if resp.status_code in (200, 404):
            return resp.status_code == 200
        raise self.fail(resp, f"checking blob {digest}")

    def _upload_url(self, digest: str, what: str) -> str:
        """POST an upload session; its Location (relative or absolute) with the digest added."""
        resp = self.request("POST", f"{self.base}/blobs/uploads/", during=f"uploading {what}",
                            headers={"Content-Type": "application/octet-stream", "Content-Length": "0"})
        if resp.status_code not in (201, 202):
            raise self.fail(resp, f"starting the upload of {what}")
        location = resp.headers.get("Location")
        if not location:
            raise OmniqError(f"registry {self.ref.host} gave no upload location for {what}")
        url = urllib.parse.urljoin(resp.url, location)
        return url + ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})

    def upload_blob(self, path: Path, digest: str, size: int) -> None:
        """A monolithic upload: POST an upload session, then one streamed PUT with the digest (the registry
        checks it)."""
        url = self._upload_url(digest, path.name)
        with open(path, "rb") as f:
            resp = self.request("PUT", url, during=f"uploading {path.name}", data=f,
                                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if resp.status_code not in (201, 204):
            raise self.fail(resp, f"uploading {path.name}")

    def upload_blob_bytes(self, data: bytes, digest: str, what: str) -> None:
        url = self._upload_url(digest, what)
        resp = self.request("PUT", url, during=f"uploading {what}", data=data,
                            headers={"Content-Type": "application/octet-stream"})
        if resp.status_code not in (201, 204):
            raise self.fail(resp, f"uploading {what}")

    def put_manifest(self, body: bytes, tag: str) -> None:
        resp = self.request("PUT", f"{self.base}/manifests/{tag}", during="tagging the manifest", data=body,
                            headers={"Content-Type": MANIFEST_MEDIA_TYPE})
        if resp.status_code not in (200, 201):
            raise self.fail(resp, "uploading the manifest")

    def download_blob(self, digest: str, size: int, dest: Path) -> None:
        """Stream a blob to `dest`, checking its size and sha256 on the way."""
        resp = self.request("GET", f"{self.base}/blobs/{digest}", during=f"downloading {dest.name}",
                            headers={}, stream=True)
        with resp:
            if resp.status_code != 200:
                raise self.fail(resp, f"downloading {dest.name}")
            h, n = hashlib.sha256(), 0
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_content(chunk_size=1 << 20):
                        h.update(chunk)
                        n += len(chunk)
                        f.write(chunk)
            except (self._requests.exceptions.ConnectionError, self._requests.exceptions.ChunkedEncodingError,
                    self._requests.exceptions.Timeout) as e:
                raise OmniqError(f"registry {self.ref.host} stopped answering while downloading {dest.name} "
                                 f"({_reason(e)}); nothing was written to the destination, run it again") from None
        got = "sha256:" + h.hexdigest()
        if got != digest or n != size:
            raise OmniqError(f"{dest.name}: the registry sent {n} bytes with digest {got}, the manifest says {size} "
                             f"bytes with {digest}; the stored artifact is damaged, nothing was written")


def _challenge(resp) -> tuple[str, dict] | None:
    """A 401's `WWW-Authenticate` challenge: ("bearer" | "basic", {realm, service, scope, ...})."""
    header = resp.headers.get("WWW-Authenticate", "")
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z]+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _reason(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "Remote end closed connection", "Connection aborted", "Temporary failure in name resolution",
                   "No route to host"):
        if marker in text:
            return marker.lower()
    return type(e).__name__


def connect(ref: OciRef, plain_http: bool = False) -> Registry:
    reg = Registry(ref, plain_http=plain_http, credentials=credentials_for(ref.host))
    reg.ping()
    return reg


# ----- push ----------------------------------------------------------------------------------------------
def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def annotations(release: rel.Release, meta: dict, manifest_sha256: str) -> dict[str, str]:
    src = meta["source"]
    name = src["model"]
    out = {
        TITLE: f"{Path(str(name)).name} {rel.recipe_name(release)}",
        "org.opencontainers.image.created": release.manifest["created"],
        f"{ANN}version": __version__,
        f"{ANN}manifest.sha256": manifest_sha256,
        f"{ANN}recipe.name": rel.recipe_name(release),
        f"{ANN}recipe": _json_bytes(meta["recipe"]).decode(),
        f"{ANN}formats": _json_bytes(meta["formats"]).decode(),
        f"{ANN}kv-cache": str(meta["kv_cache"] or "none"),
        f"{ANN}deltas": _json_bytes(meta["deltas"]).decode(),
        f"{ANN}gates.passed": "true" if meta["gates"]["passed"] else "false",
        f"{ANN}gates": _json_bytes(meta["gates"]).decode(),
        f"{ANN}source": _json_bytes(src).decode(),
        f"{ANN}source.sha256": _json_bytes(meta["source_hashes"]).decode(),
        f"{ANN}calibration": _json_bytes(meta["calibration"]).decode(),
        f"{ANN}versions": _json_bytes(meta["versions"]).decode(),
    }
    return out


@dataclass
class PushResult:
    ref: str
    digest: str                  # manifest digest the tag points at
    layers: int
    bytes_uploaded: int
    blobs_skipped: int           # already in the registry (resumed push, unchanged files)
    replaced: str | None = None  # digest the tag pointed at before (with --force)
    waived: list[str] = field(default_factory=list)   # gate problems published anyway (--allow-failed)
    unchanged: bool = False      # the tag already held this very artifact: nothing was pushed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def build_manifest(release: rel.Release, digests: dict[str, str]) -> tuple[dict, bytes, bytes]:
    """(manifest, its bytes, config blob bytes) for the artifact; pure, no network."""
    meta = rel.metadata(release)
    config = _json_bytes({"omniq": __version__, **meta})
    layers = [{"mediaType": media_type(f), "digest": f"sha256:{digests[f]}", "size": (release.path / f).stat().st_size,
               "annotations": {TITLE: f}} for f in release.files]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": layers,
        "annotations": annotations(release, meta, digests[rel.MANIFEST]),
    }
    return manifest, _json_bytes(manifest), config


def push(artifact_dir, ref: str, *, force: bool = False, allow_failed: bool = False, plain_http: bool = False,
         progress=None) -> PushResult:
    """Publish an artifact directory to `oci://HOST[:PORT]/REPO:TAG` (see the module doc)."""
    target = parse_ref(ref, need_tag=True)
    release = rel.open_release(artifact_dir)
    waived = rel.check_publishable(release, allow_failed)
    digests = rel.digests(release)
    manifest, body, config = build_manifest(release, digests)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()

    reg = connect(target, plain_http)
    existing = reg.manifest(target.tag)
    if existing is not None and _same_artifact(existing[0], manifest):
        verify_pushed(reg, target, release, digests, existing[1])
        return PushResult(str(target), existing[1], len(manifest["layers"]), 0, len(manifest["layers"]),
                          waived=waived, unchanged=True)
    if existing is not None and not force:
        raise OmniqError(f"{target} already exists ({existing[1]}); pass --force to move the tag to this artifact")
    uploaded = skipped = 0
    for i, layer in enumerate(manifest["layers"]):
        f = layer["annotations"][TITLE]
        if progress is not None:
            progress(i, len(manifest["layers"]), f)
        if reg.has_blob(layer["digest"]):
            skipped += 1
            continue
        reg.upload_blob(release.path / f, layer["digest"], layer["size"])
        uploaded += layer["size"]
    if not reg.has_blob(manifest["config"]["digest"]):
        reg.upload_blob_bytes(config, manifest["config"]["digest"], "the metadata config")
    reg.put_manifest(body, target.tag)
    verify_pushed(reg, target, release, digests, digest)
    return PushResult(str(target), digest, len(manifest["layers"]), uploaded, skipped,
                      existing[1] if existing and existing[1] != digest else None, waived)


def _same_artifact(body: bytes, manifest: dict) -> bool:
    """The tag already holds this very artifact (same omniq.json, same layers): nothing to push."""
    try:
        other = json.loads(body)
    except ValueError:
        return False
    key = f"{ANN}manifest.sha256"

    def layers(m: dict) -> list:
        return [(x.get("digest"), (x.get("annotations") or {}).get(TITLE)) for x in m.get("layers") or []]

    return ((other.get("annotations") or {}).get(key) == manifest["annotations"][key]
            and layers(other) == layers(manifest))


def verify_pushed(reg: Registry, target: OciRef, release: rel.Release, digests: dict[str, str], digest: str) -> None:
    """Read the manifest back by tag: it is the one pushed, and every layer is its file's omniq.json sha256."""
    got = reg.manifest(target.tag)
    if got is None:
        raise OmniqError(f"{target}: the registry accepted the manifest but the tag does not resolve; push again")
    body, got_digest = got
    if got_digest != digest:
        raise OmniqError(f"{target}: the tag points at {got_digest}, not the pushed {digest} (another push to "
                         "the same tag?); check the registry and push again")
    layers = {layer["annotations"][TITLE]: layer for layer in json.loads(body)["layers"]}
    if sorted(layers) != release.files:
        raise OmniqError(f"{target}: the stored manifest lists different files than the artifact; push again")
    for f, layer in layers.items():
        want = release.listed.get(f, digests[f])
        if layer["digest"] != f"sha256:{want}" or not reg.has_blob(layer["digest"]):
            raise OmniqError(f"{target}: layer {f} is {layer['digest']} in the registry but sha256:{want} in "
                             f"{rel.MANIFEST}; push again with --force")


# ----- pull ----------------------------------------------------------------------------------------------
def _layer_path(title: str, where: str) -> str:
    p = Path(title)
    if not title or p.is_absolute() or ".." in p.parts or title.startswith("/") or "\\" in title:
        raise OmniqError(f"{where}: layer title {title!r} is not a safe relative path; refusing to pull it")
    return p.as_posix()


def read_manifest(reg: Registry, src: OciRef) -> tuple[dict, str]:
    got = reg.manifest(src.reference)
    if got is None:
        raise OmniqError(f"{src}: not found in the registry; check the repository and tag")
    body, digest = got
    if src.digest and digest != src.digest:
        raise OmniqError(f"{src}: the registry returned a manifest with digest {digest}; refusing it")
    try:
        manifest = json.loads(body)
    except ValueError:
        raise OmniqError(f"{src}: the manifest is not JSON; not an omniq artifact") from None
    config_type = (manifest.get("config") or {}).get("mediaType")
    if manifest.get("artifactType") != ARTIFACT_TYPE and config_type != CONFIG_MEDIA_TYPE:
        raise OmniqError(f"{src}: not an omniq artifact (artifactType {manifest.get('artifactType')!r}); "
                         "use oras or docker for other images")
    return manifest, digest


@dataclass
class PullResult:
    ref: str
    digest: str
    path: str
    files: int
    bytes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def pull(ref: str, dest, *, force: bool = False, plain_http: bool = False, progress=None) -> PullResult:
    """Fetch `oci://...` into DIR: every layer checked against its digest, every file against omniq.json,
    written to a temporary sibling and renamed into place."""
    src = parse_ref(ref)
    dest = Path(dest).expanduser()
    if dest.exists() and not force:
        raise OmniqError(f"{dest} already exists; pass --force to replace it")
    if dest.exists() and not dest.is_dir():
        raise OmniqError(f"{dest} exists and is not a directory; remove it or choose another destination")
    reg = connect(src, plain_http)
    manifest, digest = read_manifest(reg, src)
    layers = manifest.get("layers") or []
    titles = [_layer_path((layer.get("annotations") or {}).get(TITLE, ""), str(src)) for layer in layers]
    if len(set(titles)) != len(titles) or rel.MANIFEST not in titles:
        raise OmniqError(f"{src}: the manifest has duplicate files or no {rel.MANIFEST}; not a complete artifact")
    with staged_dir(dest, tag="pull", replace=force, fsync=True) as stage:
        tmp = stage.final
        total = 0
        for i, (title, layer) in enumerate(zip(titles, layers, strict=True)):
            if progress is not None:
                progress(i, len(layers), title)
            out = tmp / title
            out.parent.mkdir(parents=True, exist_ok=True)
            reg.download_blob(layer["digest"], int(layer["size"]), out)
            total += int(layer["size"])
        release = rel.open_release(tmp)
        if sorted(titles) != release.files:
            raise OmniqError(f"{src}: the artifact's files do not match its {rel.MANIFEST}; refusing it")
        try:
            rel.digests(release)
        except OmniqError as e:
            raise OmniqError(f"{src}: {e}".replace(str(tmp), "the pulled artifact")) from None
    return PullResult(str(src), digest, str(dest), len(layers), total)
