"""The `omniq` command line: parse, call one function per command, map errors to exit codes.

Keep this module light: torch, transformers and modelopt are imported inside the commands, so
`omniq --help` stays instant. User-fixable problems raise `OmniqError` and end here as one line on stderr
with exit code 2 (1 for a failed gate or check).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from omniq import __version__
from omniq.errors import OmniqError

app = typer.Typer(
    name="omniq",
    help="Quantize NemotronH / Nemotron 3 Nano Omni checkpoints to FP8 and NVFP4 with ModelOpt, "
         "validate the artifact from its files, and prepare TensorRT-LLM deployments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"omniq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main(argv: Optional[list[str]] = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except OmniqError as e:
        typer.echo(f"omniq: error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("omniq: aborted", err=True)
        return 130
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
