"""Fixtures for the publish and pipeline tests: a real OCI registry on 127.0.0.1, small fake artifacts, and a
TCP proxy that can kill a client or cut the connection in the middle of a push. Test modules import the
fixtures they use from here (`from publish_fixtures import registry, ...`); each importing module gets its
own session-scoped registry (about a second to start and stop).

The registry is Debian's `docker-registry`, started by `scripts/registry.sh` once per session and stopped at
the end. When `.ci/run` already started one, it sets OMNIQ_TEST_REGISTRY_DIR to its state directory and the
tests use that one (and leave it running). The tests skip, saying why, only when the binary can neither be
found nor installed (registry.sh exits 3).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "registry.sh"


@dataclass
class RegistryInfo:
    addr: str            # 127.0.0.1:PORT
    state: Path          # registry.sh state dir (config.yml, data/)

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.state / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def _start(state: Path, env: dict | None = None) -> RegistryInfo:
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True,
                          env={**os.environ, "OMNIQ_REGISTRY_OWNER_PID": str(os.getpid()), **(env or {})},
                          timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no OCI registry for the publish tests: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return RegistryInfo(proc.stdout.strip().splitlines()[-1], state)


def _stop(state: Path) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    external = os.environ.get("OMNIQ_TEST_REGISTRY_DIR")
    if external:
        proc = subprocess.run(["bash", str(SCRIPT), "status", external], capture_output=True, text=True)
        assert proc.returncode == 0, f"OMNIQ_TEST_REGISTRY_DIR={external}: no registry answers there"
        yield RegistryInfo(proc.stdout.strip(), Path(external))
        return
    state = tmp_path_factory.mktemp("registry")
    info = _start(state)
    try:
        yield info
    finally:
        _stop(state)


def bcrypt_hash(password: str) -> str | None:
    """A bcrypt entry at the lowest cost (4): the registry checks it on every request."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # removed in Python 3.13

            h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
            if h and h.startswith("$2"):
                return h
        except ImportError:
            pass
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        pass
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbBC", "4", "u", password], capture_output=True, text=True).stdout
        return out.strip().split(":", 1)[1] if ":" in out else None
    return None


AUTH_USER = "alice"
AUTH_PASSWORD = "pw-Zq7-never-print-me"


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    """A second registry that wants HTTP basic auth (alice / AUTH_PASSWORD)."""
    h = bcrypt_hash(AUTH_PASSWORD)
    if h is None:
        pytest.skip("cannot make a bcrypt htpasswd entry (no crypt module, bcrypt package or htpasswd binary)")
    state = tmp_path_factory.mktemp("auth-registry")
    (state / "htpasswd").write_text(f"{AUTH_USER}:{h}\n")
    info = _start(state, {"OMNIQ_REGISTRY_HTPASSWD": str(state / "htpasswd")})
    try:
        yield info
    finally:
        _stop(state)


# ----- fake artifacts ---------------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_artifact(root: Path, *, seed: int = 0, passed: bool | None = True, lint_errors: int = 0,
                  recipe: str = "fp8") -> Path:
    """A small artifact directory shaped like `omniq quantize` output: a few files and a valid omniq.json,
    plus validation.json (None: absent) and lint.json."""
    root.mkdir(parents=True)
    body = bytes((i * 7 + seed) % 256 for i in range(4096))
    files = {
        "config.json": json.dumps({"model_type": "nemotron_h", "seed": seed}).encode(),
        "hf_quant_config.json": json.dumps({"quantization": {"quant_algo": recipe.upper()}}).encode(),
        "model-00001-of-00002.safetensors": body,
        "model-00002-of-00002.safetensors": body[::-1] + bytes([seed % 256]),
        "tokenizer.json": b'{"version": "1.0", "model": {}}',
        "tokenizer_config.json": b'{"bos_token": "<s>"}',
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    fmt = "nvfp4" if "nvfp4" in recipe else "fp8"
    manifest = {
        "omniq_manifest": 1,
        "created": "2026-01-02T03:04:05+00:00",
        "versions": {"omniq": "0.1.0", "modelopt": "0.47.0"},
        "source": {"model": "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "path": "/models/nano",
                   "files": {"model.safetensors": "ab" * 32, "config.json": "cd" * 32}},
        "recipe": {"name": recipe, "description": "test recipe", "kv_cache": "fp8", "default": fmt,
                   "rules": [{"select": ["attention", "mamba_feeding_attention"], "format": "bf16"}]},
        "calibration": {"source": "bundled:calib", "samples": 8, "seq_len": 64, "sample_sha256": ["00" * 32] * 8},
        "modules": {"backbone.layers.0.mixer.in_proj": fmt, "backbone.layers.0.mixer.out_proj": fmt,
                    "backbone.layers.2.mixer.q_proj": "bf16", "backbone.layers.9.mixer.q_proj": "bf16",
                    "backbone.layers.1.mixer.in_proj": "bf16", "lm_head": "bf16"},
        "files": {name: sha256(data) for name, data in files.items()},
    }
    (root / "omniq.json").write_text(json.dumps(manifest, indent=2))
    bound = {"candidate": {"path": str(root), "omniq.json": sha256((root / "omniq.json").read_bytes())}}
    if passed is not None:
        report = {"kl_mean": 0.0042, "kl_p95": 0.013, "top1_agreement": 0.964, "ppl_reference": 7.31,
                  "ppl_candidate": 7.36, "ppl_ratio": 1.0068, "tokens": 1024, "passed": passed,
                  "gates": {"max_kl": 0.01, "min_top1": 0.95, "max_ppl_ratio": 1.01, "source": "default fp8"},
                  "failures": [] if passed else ["kl_mean 0.0042 > max_kl 0.001"],
                  "eval": {"set": "bundled:eval", "rows": 8, "seq_len": 128}, "layer_formats": {fmt: 2, "bf16": 4},
                  "format": fmt, "kv_cache": "fp8",
                  "bound_to": {**bound, "reference": {"path": "/models/nano", "files": manifest["source"]["files"]}}}
        (root / "validation.json").write_text(json.dumps(report))
    findings = [{"id": "exclude-unmatched", "severity": "error", "tensor_or_module": "lm_head",
                 "message": "exclude name matches no module", "fix": "re-export"}] * lint_errors
    findings.append({"id": "kv-cache-fp8", "severity": "info", "tensor_or_module": "", "message": "fp8 kv",
                     "fix": ""})
    (root / "lint.json").write_text(json.dumps({"path": str(root), "engine": None, "passed": not lint_errors,
                                                "counts": {"error": lint_errors, "warning": 0, "info": 1},
                                                "findings": findings, "bound_to": bound}))
    return root


# ----- a TCP proxy that fails a push in the middle ---------------------------------------------------------
class Proxy:
    """Forwards 127.0.0.1:port to the registry. After `after` blob-upload PUT requests have gone through, the
    next one triggers the action instead of being forwarded: "cut" closes every connection and refuses new
    ones (a registry going down); "kill" SIGKILLs `self.victim` (a client dying mid-push)."""

    def __init__(self, target: str, *, after: int, action: str):
        self.host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.after, self.action = after, action
        self.victim: int | None = None
        self.seen = 0
        self.triggered = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.addr = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.triggered.is_set():
                client.close()
                continue
            upstream = socket.create_connection((self.host, self.target_port))
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, outbound):
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if outbound:
                    window = tail + data
                    n = window.count(b"PUT /v2/") - tail.count(b"PUT /v2/")
                    if n and b"/blobs/uploads/" in window:
                        with self._lock:
                            self.seen += n
                            fire = self.seen > self.after and not self.triggered.is_set()
                        if fire:
                            self._fire()
                            return
                    tail = window[-64:]
                if self.triggered.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _fire(self):
        self.triggered.set()
        if self.action == "kill" and self.victim is not None:
            os.kill(self.victim, signal.SIGKILL)
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
        if self.action == "cut":
            self.server.close()

    def close(self):
        self.triggered.set()
        try:
            self.server.close()
        except OSError:
            pass


@pytest.fixture
def proxy_factory():
    made = []

    def make(target: str, *, after: int, action: str) -> Proxy:
        p = Proxy(target, after=after, action=action)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def omniq_subprocess(*args, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omniq.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs)


# ----- a registry behind the token flow ---------------------------------------------------------------------
class TokenFront:
    """The registry behind the distribution token flow, as Docker Hub / GHCR / Harbor ask for it: any /v2/
    call without a valid bearer token gets 401 `WWW-Authenticate: Bearer realm=".../token",service=...,
    scope="repository:REPO:pull,push"`; GET /token with basic credentials (AUTH_USER / AUTH_PASSWORD) hands one
    out (anonymous: 401). Calls with a token are forwarded to the real registry (Location rewritten to here).
    `tokens` counts the tokens issued, `bearer_calls` the calls that carried one."""

    def __init__(self, target: str):
        import base64
        import http.server

        import requests

        front = self
        self.target, self.tokens, self.bearer_calls, self.issued = target, 0, 0, set()
        good = "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, headers=(), body=b""):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                if self.path.startswith("/token"):
                    if self.headers.get("Authorization") != good:
                        return self._reply(401, [("WWW-Authenticate", 'Basic realm="token"')])
                    front.tokens += 1
                    token = f"tok-{front.tokens}"
                    front.issued.add(token)
                    return self._reply(200, [("Content-Type", "application/json")],
                                       json.dumps({"token": token}).encode())
                auth = self.headers.get("Authorization", "")
                if not (auth.startswith("Bearer ") and auth[7:] in front.issued):
                    repo = self.path.split("/v2/", 1)[-1].split("/blobs/")[0].split("/manifests/")[0]
                    challenge = (f'Bearer realm="http://{front.addr}/token",service="omniq-test",'
                                 f'scope="repository:{repo}:pull,push"')
                    return self._reply(401, [("WWW-Authenticate", challenge), ("Content-Type", "application/json")],
                                       b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}')
                front.bearer_calls += 1
                skip = {"host", "authorization", "content-length", "connection"}
                r = requests.request(self.command, f"http://{front.target}{self.path}", data=body,
                                     headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
                                     allow_redirects=False, timeout=30)
                out = [(k, v.replace(front.target, front.addr)) for k, v in r.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")]
                self._reply(r.status_code, out, r.content)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
