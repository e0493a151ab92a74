"""What a pipeline stage function is handed (`StageContext`) and the set of stage functions a run uses
(`Stages`, injected so tests can replace them). `omniq.pipeline.run` drives the stages; `omniq.pipeline.stages`
has the real ones; both import this module, neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omniq.pipeline import cache
from omniq.pipeline.spec import Column, PipelineSpec, PublishTarget

Progress = Callable[[int, int, str], None]


@dataclass
class StageContext:
    """What a stage function gets: where to write, and everything it may read."""

    spec: PipelineSpec
    column: Column
    out: Path                           # an empty temporary directory, the stage's output once it returns
    source_dir: Path
    inputs: dict[str, cache.Finished]   # upstream outputs: "quantize", "lint", "validate", "eval"
    target: str | None = None           # build
    publish: PublishTarget | None = None
    ref: str | None = None              # publish, expanded
    progress: Progress | None = None
    reference_cache: Path | None = None # validate: where the reference's streams are kept across recipes

    @property
    def artifact(self) -> Path:
        q = self.inputs["quantize"]
        return q.path / q.result["path"]


StageFn = Callable[[StageContext], dict]


@dataclass
class Stages:
    quantize: StageFn
    lint: StageFn
    validate: StageFn
    build: StageFn
    publish: StageFn
    eval: StageFn | None = None         # the optional task-accuracy stage (pipeline `eval:`)
