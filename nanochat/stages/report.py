"""Assemble the report card (report.md with a summary table and training curves), or start a new one.

Every stage records a section under <base_dir>/report/ when it finishes. At the start of
a run, `nanochat report --reset` clears them and records the environment (git commit,
hardware, software, code size) and the start time. At the end, `nanochat report` renders
everything into <base_dir>/report/report.md, with PNG plots of the training curves
beside it, and copies both to --output.

  nanochat report --reset        # at the start of a run
  nanochat report                # at the end: ./report.md
  nanochat report --output runs/report.md --no-plots
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import option

log = logging.getLogger("nanochat.stages.report")


@dataclass
class Config:
    reset: bool = option(False, "start a new report: delete the recorded sections and write the header "
                                "(environment, start time) instead of assembling")
    output: str = option("report.md", "where to copy report.md (and its plots), a file or a folder", short="-o")
    plots: bool = option(True, "draw the training curves (needs matplotlib: pip install 'nanochat[report]')")


def run(config: Config, runtime: Runtime) -> dict:
    from nanochat.report import generate_report, read_header, reset_report

    if not runtime.is_master:
        return {}
    if config.reset:
        path = reset_report(runtime.base_dir)
        started = read_header(runtime.base_dir)["timestamp"]
        log.info("started a new report at %s; header written to %s", started, path)
        return {"header": str(path), "started": started}
    result = generate_report(runtime.base_dir, config.output, plots=config.plots)
    return {k: v for k, v in result.items() if k != "summary"}
