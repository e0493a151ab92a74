"""`omniq publish` / `omniq pull` against a real OCI registry on 127.0.0.1, and the hub path offline."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time

import pytest
import requests

from omniq.cli import main
from omniq.errors import GateFailed, OmniqError
from omniq.publish import hub, model_card, oci
from omniq.publish import release as rel
from publish_fixtures import (AUTH_PASSWORD, AUTH_USER, TokenFront, auth_registry, make_artifact, omniq_subprocess,  # noqa: F401
                              proxy_factory, registry)

ACCEPT = {"Accept": oci.MANIFEST_MEDIA_TYPE}


def manifest_at(addr: str, repo: str, ref: str, auth=None) -> tuple[dict, str] | None:
    r = requests.get(f"http://{addr}/v2/{repo}/manifests/{ref}", headers=ACCEPT, auth=auth, timeout=10)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return r.json(), "sha256:" + hashlib.sha256(r.content).hexdigest()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----- push, read back, pull ----------------------------------------------------------------------------
def test_push_then_pull_round_trip(registry, tmp_path, capsys):
    art = make_artifact(tmp_path / "art")
    ref = f"oci://{registry.addr}/omniq/roundtrip:v1"
    rc, out, err = run_cli(capsys, "publish", str(art), ref)
    assert rc == 0, err
    assert "verified" in out

    manifest, digest = manifest_at(registry.addr, "omniq/roundtrip", "v1")
    assert digest in out
    assert manifest["artifactType"] == oci.ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == oci.CONFIG_MEDIA_TYPE
    listed = json.loads((art / "omniq.json").read_text())["files"]
    layers = {layer["annotations"][oci.TITLE]: layer for layer in manifest["layers"]}
    assert sorted(layers) == sorted([*listed, "omniq.json", "validation.json", "lint.json"])
    for name, sha in listed.items():
        assert layers[name]["digest"] == f"sha256:{sha}"
        assert layers[name]["size"] == (art / name).stat().st_size
    assert layers["model-00001-of-00002.safetensors"]["mediaType"] == "application/vnd.omniq.safetensors"
    assert layers["config.json"]["mediaType"] == "application/vnd.omniq.config+json"
    assert layers["hf_quant_config.json"]["mediaType"] == "application/vnd.omniq.quant-config+json"
    assert layers["omniq.json"]["mediaType"] == "application/vnd.omniq.manifest+json"
    assert layers["tokenizer.json"]["mediaType"] == "application/vnd.omniq.tokenizer+json"

    ann = manifest["annotations"]
    assert json.loads(ann["vnd.omniq.recipe"])["name"] == "fp8"
    assert json.loads(ann["vnd.omniq.formats"]) == {"bf16": 4, "fp8": 2}
    assert json.loads(ann["vnd.omniq.deltas"])["kl_mean"] == pytest.approx(0.0042)
    assert json.loads(ann["vnd.omniq.source.sha256"])["model.safetensors"] == "ab" * 32
    assert ann["vnd.omniq.gates.passed"] == "true"
    assert ann["vnd.omniq.manifest.sha256"] == rel.sha256_file(art / "omniq.json")
    config = requests.get(f"http://{registry.addr}/v2/omniq/roundtrip/blobs/{manifest['config']['digest']}",
                          timeout=10).json()
    assert config["recipe"]["rules"][0]["format"] == "bf16"

    dest = tmp_path / "pulled" / "art"
    rc, out, err = run_cli(capsys, "pull", ref, str(dest))
    assert rc == 0, err
    for f in art.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in art.iterdir())
    assert [p.name for p in dest.parent.iterdir()] == ["art"]          # no temporary left beside it


def test_pull_refuses_existing_dir_and_replaces_with_force(registry, tmp_path, capsys):
    a = make_artifact(tmp_path / "a", seed=1)
    ref = f"oci://{registry.addr}/omniq/pullforce:v1"
    assert run_cli(capsys, "publish", str(a), ref)[0] == 0
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "pull", ref, str(dest))
    assert rc == 2 and "already exists" in err and "--force" in err
    assert (dest / "keep.txt").read_text() == "mine"
    rc, _, err = run_cli(capsys, "pull", ref, str(dest), "--force")
    assert rc == 0, err
    assert not (dest / "keep.txt").exists()
    assert (dest / "omniq.json").read_bytes() == (a / "omniq.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "dest"]


def test_pull_detects_a_damaged_blob(registry, tmp_path, capsys):
    art = make_artifact(tmp_path / "art", seed=2)
    ref = f"oci://{registry.addr}/omniq/damaged:v1"
    assert run_cli(capsys, "publish", str(art), ref)[0] == 0
    manifest, _ = manifest_at(registry.addr, "omniq/damaged", "v1")
    layer = next(x for x in manifest["layers"] if x["annotations"][oci.TITLE] == "model-00002-of-00002.safetensors")
    blob = registry.blob_path(layer["digest"])
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF                                   # same size, one flipped byte in the registry's storage
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out"
    rc, _, err = run_cli(capsys, "pull", ref, str(dest))
    assert rc == 2
    assert "model-00002-of-00002.safetensors" in err and layer["digest"] in err
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_pull_checks_files_against_omniq_json(registry, tmp_path, capsys):
    """A manifest whose layers are self-consistent but whose files are not the ones omniq.json lists."""
    art = make_artifact(tmp_path / "art", seed=3)
    (art / "tokenizer.json").write_bytes(b'{"tampered": true}')
    release = rel.open_release(art)
    digests = {f: rel.sha256_file(art / f) for f in release.files}      # bypasses the push-side check
    manifest, body, config = oci.build_manifest(release, digests)
    target = oci.parse_ref(f"oci://{registry.addr}/omniq/tampered:v1")
    reg = oci.connect(target)
    for layer in manifest["layers"]:
        reg.upload_blob(art / layer["annotations"][oci.TITLE], layer["digest"], layer["size"])
    reg.upload_blob_bytes(config, manifest["config"]["digest"], "config")
    reg.put_manifest(body, "v1")

    dest = tmp_path / "out"
    rc, _, err = run_cli(capsys, "pull", str(target), str(dest))
    assert rc == 2
    assert "tokenizer.json" in err and "omniq.json" in err
    assert not dest.exists()


def test_pull_of_something_else(registry, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "pull", f"oci://{registry.addr}/omniq/nothing-here:v1", str(tmp_path / "x"))
    assert rc == 2 and "not found" in err
    # an image that is not an omniq artifact
    cfg = b"{}"
    cdig = "sha256:" + hashlib.sha256(cfg).hexdigest()
    loc = requests.post(f"http://{registry.addr}/v2/other/image/blobs/uploads/", timeout=10).headers["Location"]
    sep = "&" if "?" in loc else "?"
    url = loc if loc.startswith("http") else f"http://{registry.addr}{loc}"
    assert requests.put(f"{url}{sep}digest={cdig}", data=cfg, timeout=10).status_code == 201
    body = json.dumps({"schemaVersion": 2, "mediaType": oci.MANIFEST_MEDIA_TYPE,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": 2},
                       "layers": []}).encode()
    r = requests.put(f"http://{registry.addr}/v2/other/image/manifests/v1", data=body,
                     headers={"Content-Type": oci.MANIFEST_MEDIA_TYPE}, timeout=10)
    assert r.status_code == 201, r.text
    rc, _, err = run_cli(capsys, "pull", f"oci://{registry.addr}/other/image:v1", str(tmp_path / "y"))
    assert rc == 2 and "not an omniq artifact" in err
    assert not (tmp_path / "y").exists()


# ----- tags are never moved silently ---------------------------------------------------------------------
def test_existing_tag_is_not_overwritten_without_force(registry, tmp_path, capsys):
    a = make_artifact(tmp_path / "a", seed=10)
    b = make_artifact(tmp_path / "b", seed=11)
    ref = f"oci://{registry.addr}/omniq/overwrite:v1"
    assert run_cli(capsys, "publish", str(a), ref)[0] == 0
    _, digest_a = manifest_at(registry.addr, "omniq/overwrite", "v1")

    rc, out, err = run_cli(capsys, "publish", str(b), ref)
    assert rc == 2
    assert "already exists" in err and "--force" in err and digest_a in err
    assert len(err.strip().splitlines()) == 1
    assert manifest_at(registry.addr, "omniq/overwrite", "v1")[1] == digest_a

    # the same artifact again: nothing to do, not an error, tag unchanged
    rc, out, _ = run_cli(capsys, "publish", str(a), ref)
    assert rc == 0 and "already holds this artifact" in out
    assert manifest_at(registry.addr, "omniq/overwrite", "v1")[1] == digest_a

    result = oci.push(b, ref, force=True)
    assert result.replaced == digest_a
    manifest, digest_b = manifest_at(registry.addr, "omniq/overwrite", "v1")
    assert digest_b == result.digest != digest_a
    assert manifest["annotations"]["vnd.omniq.manifest.sha256"] == rel.sha256_file(b / "omniq.json")
    assert manifest_at(registry.addr, "omniq/overwrite", digest_a) is not None   # the old one is still there by digest


# ----- failures in the middle ----------------------------------------------------------------------------
def test_registry_down_is_one_clean_line(tmp_path):
    art = make_artifact(tmp_path / "art")
    t0 = time.monotonic()
    proc = omniq_subprocess("publish", str(art), f"oci://127.0.0.1:{closed_port()}/omniq/down:v1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert time.monotonic() - t0 < 20                          # no retry loop sleeping for minutes
    assert err.startswith("omniq: error: registry 127.0.0.1:") and "not reachable" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_registry_going_down_mid_push_leaves_no_tag_and_resumes(registry, proxy_factory, tmp_path, capsys):
    art = make_artifact(tmp_path / "art", seed=20)
    proxy = proxy_factory(registry.addr, after=2, action="cut")
    rc, out, err = run_cli(capsys, "publish", str(art), f"oci://{proxy.addr}/omniq/cut:v1")
    assert proxy.triggered.is_set()
    assert rc == 2, err
    assert "not reachable" in err and "uploading" in err
    assert len(err.strip().splitlines()) == 1
    assert manifest_at(registry.addr, "omniq/cut", "v1") is None          # nothing under the tag

    result = oci.push(art, f"oci://{registry.addr}/omniq/cut:v1")        # again, registry back: resumes
    assert result.blobs_skipped == 2
    assert manifest_at(registry.addr, "omniq/cut", "v1")[1] == result.digest


@pytest.mark.parametrize("previous", [False, True], ids=["new-tag", "force-over-existing"])
def test_push_killed_mid_upload_never_moves_the_tag(registry, proxy_factory, tmp_path, previous):
    repo = f"omniq/killed-{int(previous)}"
    old = make_artifact(tmp_path / "old", seed=30)
    new = make_artifact(tmp_path / "new", seed=31)
    before = None
    if previous:
        oci.push(old, f"oci://{registry.addr}/{repo}:v1")
        before = manifest_at(registry.addr, repo, "v1")[1]
    proxy = proxy_factory(registry.addr, after=3, action="kill")
    proc = omniq_subprocess("publish", str(new), f"oci://{proxy.addr}/{repo}:v1", "--force")
    proxy.victim = proc.pid
    proc.communicate(timeout=60)
    assert proxy.triggered.is_set()
    assert proc.returncode == -9                                         # SIGKILL, mid blob upload
    got = manifest_at(registry.addr, repo, "v1")
    assert (got[1] if got else None) == before
    if previous:
        dest = tmp_path / "check"
        oci.pull(f"oci://{registry.addr}/{repo}:v1", dest)
        assert (dest / "omniq.json").read_bytes() == (old / "omniq.json").read_bytes()


# ----- credentials ---------------------------------------------------------------------------------------
def _secrets():
    pair = f"{AUTH_USER}:{AUTH_PASSWORD}"
    return [AUTH_PASSWORD, base64.b64encode(pair.encode()).decode()]


def _no_secret(*texts):
    for t in texts:
        for s in _secrets():
            assert s not in t


def test_credentials_from_environment_never_printed(auth_registry, tmp_path):
    art = make_artifact(tmp_path / "art", seed=40)
    ref = f"oci://{auth_registry.addr}/omniq/authed:v1"
    home = {"HOME": str(tmp_path / "home"), "DOCKER_CONFIG": str(tmp_path / "nodocker")}

    proc = omniq_subprocess("publish", str(art), ref, env=home)            # anonymous: refused
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "refused anonymous access" in err and "OMNIQ_REGISTRY_USER" in err

    wrong = {**home, "OMNIQ_REGISTRY_USER": AUTH_USER, "OMNIQ_REGISTRY_PASSWORD": AUTH_PASSWORD + "-wrong"}
    proc = omniq_subprocess("publish", str(art), ref, env=wrong)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "refused the credentials from environment" in err
    assert AUTH_PASSWORD not in out + err
    assert base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}-wrong".encode()).decode() not in out + err

    good = {**home, "OMNIQ_REGISTRY_USER": AUTH_USER, "OMNIQ_REGISTRY_PASSWORD": AUTH_PASSWORD}
    proc = omniq_subprocess("publish", str(art), ref, env=good)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _no_secret(out, err)
    proc = omniq_subprocess("pull", ref, str(tmp_path / "pulled"), env=good)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _no_secret(out, err)
    assert manifest_at(auth_registry.addr, "omniq/authed", "v1", auth=(AUTH_USER, AUTH_PASSWORD)) is not None


def test_token_auth_flow_push_and_pull(registry, tmp_path):
    """A registry that wants bearer tokens (realm / service / scope challenge, token for basic credentials):
    push and pull go through it with the environment's credentials, never printing them; anonymous is
    refused in one line."""
    front = TokenFront(registry.addr)
    try:
        art = make_artifact(tmp_path / "art", seed=44)
        ref = f"oci://{front.addr}/omniq/tokened:v1"
        home = {"HOME": str(tmp_path / "home"), "DOCKER_CONFIG": str(tmp_path / "nodocker")}
        proc = omniq_subprocess("publish", str(art), ref, env=home)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "refused anonymous access" in err, err
        good = {**home, "OMNIQ_REGISTRY_USER": AUTH_USER, "OMNIQ_REGISTRY_PASSWORD": AUTH_PASSWORD}
        for args in (("publish", str(art), ref), ("pull", ref, str(tmp_path / "pulled"))):
            proc = omniq_subprocess(*args, env=good)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            _no_secret(out, err)
        assert front.tokens >= 2 and front.bearer_calls > 0
        assert (tmp_path / "pulled" / "omniq.json").read_bytes() == (art / "omniq.json").read_bytes()
        assert manifest_at(registry.addr, "omniq/tokened", "v1") is not None
    finally:
        front.close()


def test_credentials_from_docker_config(auth_registry, tmp_path, monkeypatch):
    art = make_artifact(tmp_path / "art", seed=41)
    cfg_dir = tmp_path / "docker"
    cfg_dir.mkdir()
    auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    (cfg_dir / "config.json").write_text(json.dumps({"auths": {f"https://{auth_registry.addr}": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg_dir))
    monkeypatch.delenv("OMNIQ_REGISTRY_USER", raising=False)
    monkeypatch.delenv("OMNIQ_REGISTRY_PASSWORD", raising=False)
    result = oci.push(art, f"oci://{auth_registry.addr}/omniq/dockercfg:v1")
    assert result.layers == 9
    _no_secret(repr(result.as_dict()))

    # a wrong password in the docker config: the exception text carries neither form of it
    bad = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}x".encode()).decode()
    (cfg_dir / "config.json").write_text(json.dumps({"auths": {auth_registry.addr: {"auth": bad}}}))
    with pytest.raises(OmniqError) as e:
        oci.push(art, f"oci://{auth_registry.addr}/omniq/dockercfg:v2")
    assert str(cfg_dir / "config.json") in str(e.value)
    assert bad not in str(e.value) and AUTH_PASSWORD not in str(e.value)
    assert AUTH_PASSWORD not in repr(oci.credentials_for(auth_registry.addr))

    # a config that is not JSON: named, not quoted
    (cfg_dir / "config.json").write_text('{"auths": {"x": {"auth": "' + auth + '"')
    with pytest.raises(OmniqError) as e:
        oci.push(art, f"oci://{auth_registry.addr}/omniq/dockercfg:v3")
    assert auth not in str(e.value) and "config.json" in str(e.value)


def test_only_one_of_the_env_credentials(tmp_path, monkeypatch, capsys):
    art = make_artifact(tmp_path / "art")
    monkeypatch.setenv("OMNIQ_REGISTRY_USER", "bob")
    monkeypatch.delenv("OMNIQ_REGISTRY_PASSWORD", raising=False)
    rc, _, err = run_cli(capsys, "publish", str(art), f"oci://127.0.0.1:{closed_port()}/x/y:v1")
    assert rc == 2 and "OMNIQ_REGISTRY_PASSWORD is not set" in err


# ----- gates ---------------------------------------------------------------------------------------------
def test_failed_gates_block_publishing_unless_allowed(registry, tmp_path, capsys):
    failed = make_artifact(tmp_path / "failed", seed=50, passed=False)
    ref = f"oci://{registry.addr}/omniq/gated:failed"
    rc, _, err = run_cli(capsys, "publish", str(failed), ref)
    assert rc == 1 and "validation gates failed" in err and "kl_mean" in err and "--allow-failed" in err
    assert manifest_at(registry.addr, "omniq/gated", "failed") is None

    rc, out, err = run_cli(capsys, "publish", str(failed), ref, "--allow-failed")
    assert rc == 0 and "--allow-failed" in err
    manifest, _ = manifest_at(registry.addr, "omniq/gated", "failed")
    assert manifest["annotations"]["vnd.omniq.gates.passed"] == "false"
    assert "validation gates failed" in manifest["annotations"]["vnd.omniq.gates"]

    lint_bad = make_artifact(tmp_path / "lint", seed=51, lint_errors=2)
    rc, _, err = run_cli(capsys, "publish", str(lint_bad), f"oci://{registry.addr}/omniq/gated:lint")
    assert rc == 1 and "lint found 2 error(s)" in err

    unvalidated = make_artifact(tmp_path / "unvalidated", seed=52, passed=None)
    rc, _, err = run_cli(capsys, "publish", str(unvalidated), f"oci://{registry.addr}/omniq/gated:none")
    assert rc == 2 and "no validation.json" in err and "omniq validate" in err
    assert manifest_at(registry.addr, "omniq/gated", "none") is None


WRONG_SHAPES = {   # file, how it is changed, the key the error must name
    "formats instead of modules": ("omniq.json", lambda d: d.update(layer_formats=d.pop("modules")), "`modules`"),
    "files as objects": ("omniq.json", lambda d: d.update(files={k: {"sha256": v} for k, v in d["files"].items()}),
                         "`files["),
    "recipe without a name": ("omniq.json", lambda d: d["recipe"].pop("name"), "`recipe.name`"),
    "passed as a string": ("validation.json", lambda d: d.update(passed="yes"), "`passed`"),
    "no failures list": ("validation.json", lambda d: d.pop("failures"), "`failures`"),
    "finding without severity": ("lint.json", lambda d: d["findings"][0].pop("severity"), "`findings[0].severity`"),
    "unknown severity": ("lint.json", lambda d: d["findings"][0].update(severity="fatal"), "`findings[0].severity`"),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_a_file_of_another_shape_is_exit_2_naming_the_file_and_the_key(case, tmp_path, capsys):
    """omniq reads exactly the shape it writes: anything else is refused before the network, not guessed at."""
    name, change, key = WRONG_SHAPES[case]
    art = make_artifact(tmp_path / "art")
    doc = json.loads((art / name).read_text())
    change(doc)
    (art / name).write_text(json.dumps(doc))
    rc, _, err = run_cli(capsys, "publish", str(art), f"oci://127.0.0.1:{closed_port()}/omniq/x:v1")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert str(art / name) in lines[0] and key in lines[0], lines[0]


def test_artifact_is_checked_before_anything_is_sent(tmp_path, capsys):
    """Bad artifacts fail before the network (the registry address is closed on purpose)."""
    ref = f"oci://127.0.0.1:{closed_port()}/omniq/x:v1"
    a = make_artifact(tmp_path / "modified")
    (a / "config.json").write_text("{}")
    rc, _, err = run_cli(capsys, "publish", str(a), ref)
    assert rc == 2 and "differ from the sha256 in omniq.json" in err and "config.json" in err

    b = make_artifact(tmp_path / "extra")
    (b / "notes.txt").write_text("hi")
    rc, _, err = run_cli(capsys, "publish", str(b), ref)
    assert rc == 2 and "not listed in omniq.json" in err and "notes.txt" in err

    c = make_artifact(tmp_path / "missing")
    (c / "tokenizer.json").unlink()
    rc, _, err = run_cli(capsys, "publish", str(c), ref)
    assert rc == 2 and "missing" in err and "tokenizer.json" in err

    rc, _, err = run_cli(capsys, "publish", str(tmp_path / "nope"), ref)
    assert rc == 2 and "no such artifact directory" in err


@pytest.mark.parametrize("ref,fragment", [
    ("docker://h/r:t", "unknown destination"),
    ("oci://127.0.0.1:5000/Repo:t", "repository"),
    ("oci://127.0.0.1:5000/repo", "no tag"),
    ("oci://127.0.0.1:5000/repo:bad/tag", "not a valid OCI tag"),
    ("oci:///repo:t", "no registry host"),
    ("oci://127.0.0.1:5000/repo@sha256:" + "0" * 64, "needs a tag"),
    ("hf://onlyname", "expected hf://ORG/NAME"),
    ("hf://org/name@", "revision"),
])
def test_bad_references(tmp_path, capsys, ref, fragment):
    art = make_artifact(tmp_path / "art")
    rc, _, err = run_cli(capsys, "publish", str(art), ref)
    assert rc == 2 and fragment in err, err


def test_media_types():
    assert oci.media_type("model-00001-of-00004.safetensors") == "application/vnd.omniq.safetensors"
    assert oci.media_type("model.safetensors.index.json") == "application/vnd.omniq.safetensors-index+json"
    assert oci.media_type("generation_config.json") == "application/vnd.omniq.generation-config+json"
    assert oci.media_type("tokenizer.model") == "application/vnd.omniq.tokenizer"
    assert oci.media_type("chat_template.jinja") == "application/vnd.omniq.file"
    assert oci.media_type("sub/config.json") == "application/vnd.omniq.config+json"


# ----- the hub: card and plan offline, a hub that cannot be reached ----------------------------------------
def test_model_card(tmp_path):
    art = make_artifact(tmp_path / "art", recipe="nvfp4")
    card = model_card.render(rel.open_release(art), "acme/nano-nvfp4")
    assert card.startswith("---\n") and "base_model: nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16" in card
    assert "# NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 — NVFP4 (nvfp4)" in card
    # recipe and what stayed BF16, grouped with the layer indices
    assert "| 1 | `attention`, `mamba_feeding_attention` | bf16 |" in card
    assert "| `backbone.layers.*.mixer.q_proj` | 2 | 2, 9 |" in card
    assert "| `backbone.layers.*.mixer.in_proj` | 1 | 1 |" in card
    assert "| `lm_head` | 1 | - |" in card
    # deltas with their gates
    assert "| KL divergence, mean (nats/token) | 0.0042 | ≤ 0.01 |" in card
    assert "| top-1 agreement | 0.964 | ≥ 0.95 |" in card
    assert "| perplexity ratio | 1.007 | ≤ 1.01 |" in card
    assert "Gates: passed." in card
    # provenance
    assert f"`{'ab' * 32}`" in card and rel.sha256_file(art / "omniq.json") in card
    assert "modelopt 0.47.0" in card and "bundled:calib" in card
    # serving
    assert "trtllm-serve acme/nano-nvfp4 --backend pytorch" in card and "mamba_ssm_cache_dtype: float32" in card
    assert "vllm serve acme/nano-nvfp4 --quantization modelopt_fp4 --kv-cache-dtype fp8" in card
    assert "Blackwell" in card

    failed = make_artifact(tmp_path / "failed", passed=False)
    card = model_card.render(rel.open_release(failed))
    assert "**not passed**" in card and "--quantization modelopt " in card
    unvalidated = make_artifact(tmp_path / "unvalidated", passed=None)
    assert "Not measured" in model_card.render(rel.open_release(unvalidated))


def test_hub_upload_plan(tmp_path):
    art = make_artifact(tmp_path / "art")
    p = hub.plan(art, "hf://acme/nano-fp8@v1.0")
    assert (p.ref.repo_id, p.ref.revision) == ("acme/nano-fp8", "v1.0")
    assert p.files == sorted([*json.loads((art / "omniq.json").read_text())["files"], "omniq.json",
                              "validation.json", "lint.json", "README.md"])
    assert p.commit_message == "omniq: fp8 artifact (kl_mean 0.0042, top1_agreement 0.964, ppl_ratio 1.007)"
    assert rel.sha256_file(art / "omniq.json") in p.commit_description and "gates passed" in p.commit_description
    staged = hub.stage(p, tmp_path / "stage")
    assert sorted(str(x.relative_to(staged)) for x in staged.rglob("*") if x.is_file()) == p.files
    assert (staged / "README.md").read_text() == p.card and "acme/nano-fp8" in p.card
    assert (staged / "config.json").read_bytes() == (art / "config.json").read_bytes()
    assert not (art / "README.md").exists()                                # the artifact is not modified

    (art / "README.md").write_text("# my own card\n")
    assert hub.plan(art, "hf://acme/nano-fp8").card is None                 # the artifact's own card wins

    with pytest.raises(GateFailed):
        hub.plan(make_artifact(tmp_path / "failed", passed=False), "hf://acme/x")
    assert hub.plan(make_artifact(tmp_path / "failed2", passed=False), "hf://acme/x", allow_failed=True).waived


def test_unreachable_hub_is_a_clean_exit_2(tmp_path):
    art = make_artifact(tmp_path / "art")
    token = "hf_secretTOKENnever1234"
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": token, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    t0 = time.monotonic()
    proc = omniq_subprocess("publish", str(art), "hf://acme/nano-fp8", env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.startswith("omniq: error: hf://acme/nano-fp8: the hub upload failed") and "HF_ENDPOINT" in err
    assert len(err.strip().splitlines()) == 1 and token not in out + err
    assert time.monotonic() - t0 < 60


def test_help_of_publish_pull_pipeline_stays_light():
    from cli_subprocess import cli_imports

    r = cli_imports([[c, "--help"] for c in ("publish", "pull", "pipeline")],
                    ("torch", "oras", "matplotlib", "huggingface_hub", "requests"))
    assert r["rcs"] == [0, 0, 0] and r["heavy"] == []
