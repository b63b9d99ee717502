"""
The `nanochat` command: one subcommand per pipeline stage.

Each stage lives in `nanochat/stages/<module>.py` and exposes a `Config` dataclass and
`run(config, runtime) -> dict`. This module is the only reader of `sys.argv`; it builds
the `Runtime` once and hands it to the stage. Under torchrun
(`torchrun --nproc_per_node=N -m nanochat base-train ...`) the same entry point runs
on every rank.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys

from nanochat.config import add_dataclass_args, from_args

log = logging.getLogger("nanochat")

# subcommand -> module under nanochat.stages, in pipeline order
STAGES: dict[str, str] = {
    "download": "download",
    "ingest": "ingest",
    "tok-train": "tok_train",
    "tok-eval": "tok_eval",
    "base-train": "base_train",
    "base-loss": "base_loss",
    "base-eval": "base_eval",
    "sft": "sft",
    "chat-eval": "chat_eval",
    "rl": "rl",
    "chat": "chat_cli",
    "serve": "serve",
    "report": "report",
    "bench-tok": "bench_tok",
    "bench-train": "bench_train",
    "bench-infer": "bench_infer",
    "bench-sandbox": "bench_sandbox",
    "export": "export",
    "import-hf": "import_hf",
}


def available_stages() -> dict[str, str]:
    return {name: mod for name, mod in STAGES.items()
            if importlib.util.find_spec(f"nanochat.stages.{mod}") is not None}


def _load(module: str):
    return importlib.import_module(f"nanochat.stages.{module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat", description="From raw text to a chat model, one stage at a time.")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, module in available_stages().items():
        mod = _load(module)
        doc = (mod.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_dataclass_args(p, mod.Config)
        g = p.add_argument_group("runtime")
        g.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"],
                       help="device to run on (default: cuda if available, else cpu)")
        g.add_argument("--base-dir", default=None,
                       help="root for all outputs (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
        g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nanochat.common import build_runtime, setup_logging
    from nanochat.downloads import DownloadError
    from nanochat.errors import UserError
    from nanochat.training import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(logging, args.log_level))
    mod = _load(args._module)

    def fail(e: BaseException, status: int) -> int:
        print(f"nanochat {args.stage}: error: {e}", file=sys.stderr)
        return status

    # Only errors whose message already says what to do are cut to one line: a UserError
    # (exit 2), a download that failed for good or a diverged run (exit 1). Anything else
    # (a ValueError from pyarrow, an unpacking error, a shape bug) is a bug report and
    # keeps its traceback.
    try:
        config = from_args(mod.Config, args)
        if hasattr(config, "validate"):
            config.validate()
        runtime = build_runtime(args.device_type, args.base_dir)
    except UserError as e:
        return fail(e, 2)
    try:
        metrics = mod.run(config, runtime)
    except UserError as e:
        return fail(e, 2)
    except (DownloadError, NonFiniteLossError) as e:
        return fail(e, 1)
    except KeyboardInterrupt:
        print(f"nanochat {args.stage}: interrupted", file=sys.stderr)
        return 130
    finally:
        runtime.close()
    if runtime.is_master and metrics:
        log.info("result: %s", json.dumps(metrics, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
