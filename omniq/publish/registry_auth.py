"""Where OCI registry credentials come from, and how they are kept out of every message.

In order:
1. `OMNIQ_REGISTRY_USER` and `OMNIQ_REGISTRY_PASSWORD` (both, or neither) in the environment;
2. the standard docker config file, `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`: its `auths`
   entry for the registry host (`host:port`, with or without `https://` / `http://` and a path), either
   `auth` (base64 of `user:password`, what `docker login` writes) or `username` + `password`.
Credential helpers (`credsStore`, `credHelpers`) are not run: use the environment variables in CI.

Nothing here prints or logs a credential; `Credentials.redact` removes the password (and its base64 forms)
from any text before it reaches the user.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from omniq.errors import OmniqError

ENV_USER = "OMNIQ_REGISTRY_USER"
ENV_PASSWORD = "OMNIQ_REGISTRY_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = ""                   # where they came from, for messages ("environment", a file path)

    def __repr__(self) -> str:        # never the password
        return f"Credentials(username={self.username!r}, source={self.source!r})"

    def secrets(self) -> list[str]:
        pw = self.password
        pair = f"{self.username}:{pw}"
        b64 = base64.b64encode(pair.encode()).decode()
        return [s for s in (pair, b64, b64.rstrip("="), pw) if s]

    def redact(self, text: str) -> str:
        for s in self.secrets():
            text = text.replace(s, "***")
        return text


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base).expanduser() if base else Path.home() / ".docker") / "config.json"


def _host_of(key: str) -> str:
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0].lower()


def from_docker_config(host: str, path: Path | None = None) -> Credentials | None:
    path = path or docker_config_path()
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        # The file holds secrets: say which file, never what is in it.
        raise OmniqError(f"{path}: not a readable docker config (JSON); fix it or set {ENV_USER} and "
                         f"{ENV_PASSWORD}") from None
    auths = cfg.get("auths") if isinstance(cfg, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _host_of(key) != host.lower() or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(str(entry["auth"]), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise OmniqError(f"{path}: the auths entry for {host} is not base64 of user:password; run "
                                 f"`docker login {host}` again or set {ENV_USER} and {ENV_PASSWORD}") from None
            if user and pw:
                return Credentials(user, pw, str(path))
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]), str(path))
    return None


def credentials_for(host: str) -> Credentials | None:
    """The credentials to use for a registry host (`host[:port]`), or None to go anonymous."""
    user, pw = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user or pw:
        if not (user and pw):
            missing = ENV_PASSWORD if user else ENV_USER
            raise OmniqError(f"{missing} is not set but {ENV_USER if user else ENV_PASSWORD} is; set both "
                             "or neither")
        return Credentials(user, pw, "environment")
    return from_docker_config(host)
