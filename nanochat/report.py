"""
The report card: each stage records a section (config, key metrics, timings) as it
finishes; `nanochat report` assembles them into one markdown file with a summary table
and training curves.

Sections are JSON files under `<base_dir>/report/`, one per stage title, written
atomically, so a crashed stage never leaves half a section behind. `reset_report`
(`nanochat report --reset`, at the start of a run) clears them and writes `header.json`:
the environment (git, hardware, software, code size) and the start time. `generate_report`
renders header, sections in pipeline order, a BASE/SFT/RL table of the headline metrics,
the wall-clock time and cost, and PNG plots of the metrics.jsonl files that training
stages write beside their checkpoints.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nanochat.common import atomic_path, atomic_write_text

log = logging.getLogger("nanochat.report")

HEADER = "header"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

# Pipeline order of the sections; any other section follows, oldest first.
SECTION_ORDER = (
    "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
    "Base model evaluation", "Chat SFT", "SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl",
)
# The summary table: its rows, and for each column the sections its values come from
# (first hit wins) and the rows that column can have (a base model has no chat metrics,
# and its CORE tasks arc_easy/arc_challenge are not the chat ARC evaluations).
SUMMARY_ROWS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")
_CHAT_ROWS = SUMMARY_ROWS[1:]
SUMMARY_SOURCES = {
    "base": (("Base model evaluation", "Base model training"), ("CORE",)),
    "sft": (("Chat evaluation sft",), _CHAT_ROWS),
    "rl": (("Chat evaluation rl",), _CHAT_ROWS),
}
# Training stages whose metrics.jsonl is plotted, and the sections naming their checkpoint dir.
PLOT_STAGES = {"base": ("Base model training",), "sft": ("Chat SFT", "SFT"), "rl": ("Chat RL",)}
# Rough on-demand prices per GPU-hour in USD (cloud list prices, 2025); others: DEFAULT_GPU_RATE.
GPU_HOURLY_USD = (("h200", 3.50), ("h100", 3.00), ("a100", 1.79), ("v100", 0.55))
DEFAULT_GPU_RATE = 2.00
# What counts as the project's code for the size ("bloat") metrics.
CODE_EXTENSIONS = (".py", ".md", ".rs", ".html", ".toml", ".sh")


# -----------------------------------------------------------------------------
# Sections

def report_dir(base_dir: Path) -> Path:
    return Path(base_dir) / "report"


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _record(title: str, data: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {"title": title, "timestamp": time.strftime(TIMESTAMP_FORMAT, time.localtime(now)), "time": now,
            "data": data}


def log_section(base_dir: Path, title: str, data: dict[str, Any]) -> Path:
    """Record (or replace) one stage's section of the report."""
    if slugify(title) == HEADER:
        raise ValueError(f"the section title {title!r} is reserved for the report header")
    path = report_dir(base_dir) / f"{slugify(title)}.json"
    atomic_write_text(path, json.dumps(_record(title, data), indent=2, default=str))
    return path


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("skipping unreadable report section %s (%s)", path, e)
        return None
    if not isinstance(record, dict) or "title" not in record:
        log.warning("skipping %s: not a report section", path)
        return None
    return record


def read_sections(base_dir: Path) -> list[dict]:
    """Every stage's section (not the header), oldest first."""
    d = report_dir(base_dir)
    if not d.is_dir():
        return []
    sections = [s for p in sorted(d.glob("*.json")) if p.stem != HEADER and (s := _read_json(p)) is not None]
    return sorted(sections, key=section_time)


def read_header(base_dir: Path) -> dict | None:
    path = report_dir(base_dir) / f"{HEADER}.json"
    return _read_json(path) if path.is_file() else None


def section_time(section: dict) -> float:
    """Seconds since the epoch when the section was written (0 when unknown)."""
    if isinstance(section.get("time"), (int, float)):
        return float(section["time"])
    try:
        return datetime.datetime.strptime(section.get("timestamp", ""), TIMESTAMP_FORMAT).timestamp()
    except ValueError:
        return 0.0


def ordered_sections(sections: list[dict]) -> list[dict]:
    """Known sections in pipeline order, then the others oldest first."""
    rank = {title: i for i, title in enumerate(SECTION_ORDER)}
    return sorted(sections, key=lambda s: (rank.get(s["title"], len(rank)), section_time(s)))


# -----------------------------------------------------------------------------
# Environment (the header)

def repo_root() -> Path:
    """The folder holding the nanochat package (a git checkout for editable installs)."""
    return Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(root: Path | None = None) -> dict[str, Any]:
    root = root or repo_root()
    commit = _run(["git", "rev-parse", "--short", "HEAD"], root)
    if commit is None:
        return {"commit": "unknown", "branch": "unknown", "dirty": None, "message": ""}
    status = _run(["git", "status", "--porcelain"], root)
    message = (_run(["git", "log", "-1", "--pretty=%s"], root) or "").strip()
    return {"commit": commit.strip(), "branch": (_run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root) or "").strip(),
            "dirty": bool(status.strip()) if status is not None else None, "message": message[:80]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info() -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.release()}", "cpu": _cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=False), "cpu_threads": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1), "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2 ** 30, 1)})
        info["cuda"] = torch.version.cuda
    return info


def software_info() -> dict[str, Any]:
    import torch
    try:
        version = importlib.metadata.version("nanochat")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "nanochat": version}


def _code_files(root: Path) -> list[Path]:
    listed = _run(["git", "ls-files", "-z"], root)
    if listed is not None:
        names = [n for n in listed.split("\0") if n]
    else:  # not a checkout (an installed wheel): the package itself
        names = [str(p.relative_to(root)) for p in (root / "nanochat").rglob("*") if p.is_file()]
    return [root / n for n in names if n.endswith(CODE_EXTENSIONS) and (root / n).is_file()]


def _dependencies(root: Path) -> list[str]:
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
            return list(tomllib.loads(pyproject.read_text())["project"].get("dependencies", []))
        except (ImportError, KeyError, ValueError):
            pass
    try:
        requires = importlib.metadata.requires("nanochat") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in requires if "extra ==" not in r]


def code_size(root: Path | None = None) -> dict[str, int]:
    """Characters, lines, files, approximate tokens (characters / 4) of the code and
    docs, and the number of runtime dependencies."""
    root = root or repo_root()
    chars = lines = 0
    files = _code_files(root)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    return {"characters": chars, "lines": lines, "files": len(files), "tokens": chars // 4,
            "dependencies": len(_dependencies(root))}


def environment_info() -> dict[str, Any]:
    return {"git": git_info(), "hardware": hardware_info(), "software": software_info(), "code": code_size(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def reset_report(base_dir: Path) -> Path:
    """Start a new report: delete the sections, plots and report.md, and write the header
    (environment and start time). Returns the header's path."""
    d = report_dir(base_dir)
    if d.is_dir():
        for path in list(d.glob("*.json")) + list(d.glob("*.png")) + [d / "report.md"]:
            path.unlink(missing_ok=True)
    path = d / f"{HEADER}.json"
    atomic_write_text(path, json.dumps(_record("Header", environment_info()), indent=2, default=str))
    return path


# -----------------------------------------------------------------------------
# Metrics for the summary

def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def find_metric(data: Any, name: str) -> float | None:
    """The value of metric `name` anywhere in a section's data, breadth first (so a
    top-level value wins over a nested one). Keys match ignoring case and punctuation,
    optionally followed by "metric", "accuracy", "acc" or "score": "CORE metric",
    "core" and "core_score" all match CORE; "chatcore" does not."""
    wanted = {_norm(name) + suffix for suffix in ("", "metric", "accuracy", "acc", "score")}
    queue = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            for key, value in node.items():
                if _is_number(value) and _norm(str(key)) in wanted:
                    return float(value)
            queue.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            queue.extend(v for v in node if isinstance(v, (dict, list)))
    return None


def summary_metrics(sections: list[dict]) -> dict[str, dict[str, float | None]]:
    """{column: {row: value or None}} for the summary table."""
    by_title = {s["title"]: s.get("data", {}) for s in sections}
    table: dict[str, dict[str, float | None]] = {}
    for column, (sources, rows) in SUMMARY_SOURCES.items():
        table[column] = {}
        for row in SUMMARY_ROWS:
            value = None
            for title in sources if row in rows else ():
                if title in by_title and (value := find_metric(by_title[title], row)) is not None:
                    break
            table[column][row] = value
    return table


def format_summary_table(table: dict[str, dict[str, float | None]]) -> str:
    columns = list(SUMMARY_SOURCES)
    lines = ["| Metric | " + " | ".join(c.upper() for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in SUMMARY_ROWS:
        cells = [f"{table[c][row]:.4f}" if table[c].get(row) is not None else "-" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Rendering

def _fmt_scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        return f"{v:.4g}" if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3) else f"{v:.4f}"
    return str(v)


def _fence(text: str, indent: str) -> list[str]:
    fence = "````" if "```" in text else "```"
    return [indent + fence] + [indent + line for line in text.splitlines()] + [indent + fence]


def _render(key: str, value: Any, depth: int) -> list[str]:
    indent = "  " * depth
    if isinstance(value, dict):
        if not value:
            return [f"{indent}- {key}: {{}}"]
        out = [f"{indent}- {key}:"]
        for k, v in value.items():
            out += _render(str(k), v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) and not (isinstance(v, str) and ("\n" in v or len(v) > 60))
               for v in value) and len(value) <= 16:
            return [f"{indent}- {key}: [{', '.join(_fmt_scalar(v) for v in value)}]"]
        if all(isinstance(v, str) for v in value):  # samples and the like: one block each
            out = [f"{indent}- {key}:"]
            for v in value:
                out += _fence(v, indent + "  ")
            return out
        out = [f"{indent}- {key}:"]
        for i, v in enumerate(value):
            out += _render(str(i), v, depth + 1)
        return out
    if isinstance(value, str) and "\n" in value:
        return [f"{indent}- {key}:"] + _fence(value, indent + "  ")
    return [f"{indent}- {key}: {_fmt_scalar(value)}"]


def render_section(section: dict) -> str:
    lines = [f"## {section['title']}", f"timestamp: {section.get('timestamp', 'unknown')}", ""]
    data = section.get("data", {})
    if isinstance(data, dict):
        for key, value in data.items():
            lines += _render(str(key), value, 0)
    else:
        lines += _render("data", data, 0)
    return "\n".join(lines) + "\n"


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def hourly_rate(gpus: list[dict]) -> float | None:
    """USD per hour of all the GPUs together, from GPU_HOURLY_USD; None without GPUs."""
    if not gpus:
        return None
    total = 0.0
    for gpu in gpus:
        name = str(gpu.get("name", "")).lower()
        total += next((rate for key, rate in GPU_HOURLY_USD if key in name), DEFAULT_GPU_RATE)
    return total


def render_header(header: dict | None) -> str:
    lines = ["# nanochat training report", "", f"Generated: {time.strftime(TIMESTAMP_FORMAT)}", ""]
    if header is None:
        lines += ["(No header: run `nanochat report --reset` when a run starts to record its environment "
                  "and start time.)", ""]
        return "\n".join(lines)
    env = header.get("data", {})
    git, hw, sw = env.get("git", {}), env.get("hardware", {}), env.get("software", {})
    dirty = {True: " (dirty)", False: " (clean)"}.get(git.get("dirty"), "")
    lines += [f"Run started: {header.get('timestamp', 'unknown')}", "", "## Environment", "", "### Git", "",
              f"- Branch: {git.get('branch', 'unknown')}", f"- Commit: {git.get('commit', 'unknown')}{dirty}",
              f"- Message: {git.get('message', '')}", "", "### Hardware", "",
              f"- Platform: {hw.get('platform', 'unknown')}",
              f"- CPU: {hw.get('cpu', 'unknown')}, {hw.get('cpu_cores')} cores ({hw.get('cpu_threads')} threads)",
              f"- Memory: {hw.get('memory_gb', 0):.1f} GB"]
    gpus = hw.get("gpus") or []
    if gpus:
        names = ", ".join(sorted({g.get("name", "?") for g in gpus}))
        lines += [f"- GPUs: {len(gpus)}x {names}", f"- GPU memory: {sum(g.get('memory_gb', 0) for g in gpus):.1f} GB total",
                  f"- CUDA: {hw.get('cuda')}", f"- Hourly rate (estimate): ${hourly_rate(gpus):.2f}/hour"]
    else:
        lines.append("- GPUs: none")
    lines += ["", "### Software", "", f"- Python: {sw.get('python')}", f"- PyTorch: {sw.get('torch')}",
              f"- nanochat: {sw.get('nanochat')}", ""]
    return "\n".join(lines)


def render_code_size(code: dict) -> str:
    return "\n".join([f"- Characters: {code.get('characters', 0):,}", f"- Lines: {code.get('lines', 0):,}",
                      f"- Files: {code.get('files', 0):,}", f"- Tokens (approx): {code.get('tokens', 0):,}",
                      f"- Dependencies: {code.get('dependencies', 0):,}"])


# -----------------------------------------------------------------------------
# Plots

def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                log.warning("skipping a malformed line of %s", path)
    return records


def _find_key(data: Any, key: str) -> Any:
    queue = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node[key]
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


def metrics_file(base_dir: Path, stage: str, sections: list[dict]) -> Path | None:
    """The metrics.jsonl of a training stage: the run named by its section's
    checkpoint_dir, else the most recently written one of that stage."""
    from nanochat.checkpoint import stage_root
    section = next((s for s in sections if s["title"] in PLOT_STAGES[stage]), None)
    named = _find_key(section.get("data", {}), "checkpoint_dir") if section else None
    if named and (Path(named) / "metrics.jsonl").is_file():
        return Path(named) / "metrics.jsonl"
    candidates = list(stage_root(base_dir, stage).glob("*/metrics.jsonl"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


# (panel title, y label, [(record key, line label)])
_PANELS = (
    ("train loss", "loss", [("loss", "loss"), ("loss_ema", "smoothed")]),
    ("validation", "bits per byte", [("val_bpb", "val bpb")]),
    ("CORE", "CORE", [("core", "CORE")]),
    ("ChatCORE", "ChatCORE", [("chatcore", "ChatCORE")]),
    ("reward", "mean reward", [("reward", "reward")]),
    ("pass@k (GSM8K test)", "fraction solved", None),  # pass@1 .. pass@k, found in the records
)


def plot_metrics(records: list[dict], out_path: Path, title: str) -> bool:
    """Draw the panels for which `records` have data into one PNG (written atomically).
    Returns False when there is nothing to plot. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    passk = sorted({k for r in records for k in r if re.fullmatch(r"pass@\d+", k)}, key=lambda k: int(k[5:]))
    panels = []
    for name, ylabel, series in _PANELS:
        series = series if series is not None else [(k, k) for k in passk]
        points = []
        for key, label in series:
            xy = [(r["step"], r[key]) for r in records if _is_number(r.get(key)) and _is_number(r.get("step"))]
            if xy:
                points.append((label, xy))
        if points:
            panels.append((name, ylabel, points))
    if not panels:
        return False
    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the process
    fig = Figure(figsize=(4.5 * len(panels), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, ylabel, points) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, xy in points:
            xs, ys = zip(*xy)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                    alpha=0.5 if label == "loss" and len(points) > 1 else 1.0)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(points) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def make_plots(base_dir: Path, sections: list[dict]) -> tuple[dict[str, Path], str | None]:
    """PNGs of each training stage's metrics in the report folder: ({stage: path}, note).
    The note says why plots were skipped (matplotlib missing), else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed (pip install 'nanochat[report]')"
    plots = {}
    for stage in PLOT_STAGES:
        path = metrics_file(base_dir, stage, sections)
        if path is None:
            continue
        records = read_metrics(path)
        out = report_dir(base_dir) / f"report-{stage}.png"
        if plot_metrics(records, out, f"{stage}: {path.parent.name}"):
            plots[stage] = out
    return plots, None


# -----------------------------------------------------------------------------
# The report

def generate_report(base_dir: Path, output: str | os.PathLike | None = None, plots: bool = True) -> dict[str, Any]:
    """Write `<base_dir>/report/report.md` (and plots beside it) and copy both to
    `output` (a file path, or a folder to put report.md in). Returns what it did."""
    base_dir = Path(base_dir)
    d = report_dir(base_dir)
    header = read_header(base_dir)
    sections = ordered_sections(read_sections(base_dir))
    if header is None:
        log.warning("the report has no header: run `nanochat report --reset` when a run starts "
                    "(environment and wall-clock time will be missing)")
    if not sections:
        log.warning("no stage has logged a section to %s yet", d)

    parts = [render_header(header)]
    for section in sections:
        parts.append(render_section(section))

    plot_paths, plot_note = make_plots(base_dir, sections) if plots else ({}, None)
    if plot_note:
        log.warning(plot_note)
    if plot_paths or plot_note:
        lines = ["## Training curves", ""]
        lines += [f"![{stage} training]({p.name})" for stage, p in plot_paths.items()]
        if plot_note:
            lines.append(f"({plot_note})")
        parts.append("\n".join(lines) + "\n")

    table = summary_metrics(sections)
    code = (header or {}).get("data", {}).get("code") or code_size()
    summary = ["## Summary", "", render_code_size(code), "", format_summary_table(table), ""]
    wall = None
    if header is not None and sections:
        wall = max(section_time(s) for s in sections) - section_time(header)
        summary.append(f"Total wall clock time: {_fmt_duration(wall)}")
        rate = hourly_rate(header.get("data", {}).get("hardware", {}).get("gpus") or [])
        if rate is None:
            summary.append("Estimated cost: none (no GPU)")
        else:
            summary.append(f"Estimated cost: ${rate * wall / 3600:,.2f} (at ${rate:.2f}/hour)")
    else:
        summary.append("Total wall clock time: unknown")
    parts.append("\n".join(summary) + "\n")

    report_path = d / "report.md"
    atomic_write_text(report_path, "\n".join(parts))
    log.info("wrote %s", report_path)

    copied = None
    if output is not None:
        out = Path(output)
        if out.is_dir() or str(output).endswith(("/", os.sep)):
            out = out / "report.md"
        if out.resolve() != report_path.resolve():
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                shutil.copyfile(report_path, tmp)
            for p in plot_paths.values():
                with atomic_path(out.parent / p.name) as tmp:
                    shutil.copyfile(p, tmp)
            log.info("copied the report to %s", out)
        copied = out
    return {"report": str(report_path), "output": str(copied) if copied else None,
            "sections": [s["title"] for s in sections], "plots": {k: str(v) for k, v in plot_paths.items()},
            "plot_note": plot_note, "summary": table, "wall_clock_s": wall}
