"""
The report card's data: each stage appends its section (config, key metrics, timings)
as it finishes; `nanochat report` assembles them into report.md.

Sections are JSON files under `<base_dir>/report/`, one per stage, written atomically,
so a crashed stage never leaves half a section behind.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_text


def report_dir(base_dir: Path) -> Path:
    return Path(base_dir) / "report"


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def log_section(base_dir: Path, title: str, data: dict[str, Any]) -> Path:
    """Record (or replace) one stage's section of the report."""
    path = report_dir(base_dir) / f"{slugify(title)}.json"
    record = {"title": title, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data}
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return path


def read_sections(base_dir: Path) -> list[dict]:
    d = report_dir(base_dir)
    if not d.is_dir():
        return []
    sections = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    return sorted(sections, key=lambda s: s["timestamp"])
