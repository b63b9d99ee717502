"""A small CORE eval bundle for tests: the bundle's config files and a few tasks' data."""
from __future__ import annotations

import shutil
from pathlib import Path

LABELS = ("copa", "arc_easy", "bigbench_operators")


def mini_core_bundle(bundle: Path, base: Path, labels: tuple[str, ...] = LABELS) -> Path:
    """Copy core.yaml, eval_meta_data.csv and the data of `labels` from `bundle` into
    `base/eval_bundle` (where base-eval looks); returns that directory."""
    from nanochat.core_eval import load_task_specs

    sub = base / "eval_bundle"
    sub.mkdir(parents=True, exist_ok=True)
    for name in ("core.yaml", "eval_meta_data.csv"):
        shutil.copy(bundle / name, sub / name)
    specs = {s.label: s for s in load_task_specs(bundle)}
    for label in labels:
        dst = sub / "eval_data" / specs[label].dataset_uri
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle / "eval_data" / specs[label].dataset_uri, dst)
    return sub
