"""`omniq.cli.main` in a fresh process, for tests (a module of its own name: `conftest` is ambiguous between
tests/ and tests/validate/ when both are collected)."""

from __future__ import annotations

import json


def run_cli_in_subprocess(args: list[str], one_thread: bool = False) -> dict:
    """`omniq.cli.main(args)` in a fresh process (ModelOpt patches torch process-wide, so the test process
    never imports it) -> {"rc", "stdout", "stderr"}."""
    import subprocess
    import sys

    code = ("import contextlib, io, json, sys\n"
            + ("import torch\ntorch.set_num_threads(1)\n" if one_thread else "")
            + "from omniq.cli import main\n"
            "out, err = io.StringIO(), io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "    rc = main(json.loads(sys.argv[1]))\n"
            "print(json.dumps({'rc': rc, 'stdout': out.getvalue(), 'stderr': err.getvalue()}))\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def cli_imports(commands: list[list[str]], modules: tuple[str, ...]) -> dict:
    """`omniq.cli.main(args)` for each of `commands`, in one fresh process (stdout captured) -> {"rcs", "heavy":
    which of `modules` are imported after them (sorted), "stdout"}: what keeps `--help` and config-only
    commands instant."""
    import subprocess
    import sys

    code = ("import contextlib, io, json, sys\n"
            "from omniq.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    rcs = [main(c) for c in json.loads(sys.argv[1])]\n"
            "heavy = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)\n"
            "print(json.dumps({'rcs': rcs, 'heavy': heavy, 'stdout': out.getvalue()}))\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(commands), json.dumps(list(modules))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
