"""Reports bound to what they judge (`omniq.validate.binding`): `omniq publish` refuses a validation.json or
lint.json that judged another artifact or compared with another reference (exit 1, naming the file, before
the network). tests/validate/test_binding.py: what validate and lint record, and where they refuse to write."""

from __future__ import annotations

import json
import shutil
import socket

from omniq.cli import main
from publish_fixtures import make_artifact


def _closed_ref() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"oci://127.0.0.1:{port}/omniq/x:v1"


def _publish(capsys, path) -> tuple[int, str]:
    rc = main(["publish", str(path), _closed_ref()])
    return rc, capsys.readouterr().err


def test_report_of_another_artifact_is_refused(tmp_path, capsys):
    a = make_artifact(tmp_path / "a", seed=1)
    b = make_artifact(tmp_path / "b", seed=2)
    shutil.copyfile(b / "validation.json", a / "validation.json")
    rc, err = _publish(capsys, a)
    assert rc == 1 and f"{a / 'validation.json'} judged another artifact" in err, err
    assert len(err.strip().splitlines()) == 1
    # --allow-failed waves failed gates through, never a report about something else
    assert main(["publish", str(a), _closed_ref(), "--allow-failed"]) == 1
    capsys.readouterr()
    shutil.copyfile(b / "lint.json", a / "lint.json")
    rc, err = _publish(capsys, a)
    assert rc == 1 and "lint.json judged another artifact" in err


def test_report_against_another_reference_or_unbound_is_refused(tmp_path, capsys):
    a = make_artifact(tmp_path / "a", seed=3)
    v = json.loads((a / "validation.json").read_text())
    v["bound_to"]["reference"]["files"]["model.safetensors"] = "ee" * 32
    (a / "validation.json").write_text(json.dumps(v))
    rc, err = _publish(capsys, a)
    assert rc == 1 and "validation.json compared with another reference" in err and "model.safetensors" in err
    v.pop("bound_to")
    (a / "validation.json").write_text(json.dumps(v))
    rc, err = _publish(capsys, a)
    assert rc == 1 and "validation.json records no bound_to" in err
