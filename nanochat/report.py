"""
Stage reports: each stage writes a markdown section (metrics, timings, flags, environment) to
`outs/<stage>/report.md` and puts the same section into `outs/report.md`, the run's whole story. A rerun of a
stage replaces its section in `outs/report.md` in place instead of adding a second copy.

`outs/report.md` opens with a one-screen summary: one row per stage with its headline numbers, the metrics of
HEADLINE_METRICS that the stage reports (one list here rather than a choice in every script, so the summary reads
alike for every stage; a key ending in "/" stands for every metric it starts, such as one per data set), rebuilt
from the sections on every write.
"""

import os
import platform
import re
import subprocess
import sys
import time

import torch

from nanochat.common import atomic_write, get_world_size, is_master


# the numbers a reader looks for first, in this order, wherever a stage reports them
HEADLINE_METRICS = (
    "val_bytes_per_token", "val_bpb_final", "val_loss_final", "pairs_train", "pairs_test", "shorter_wins",
    "unique_prompts", "world/accuracy", "ess_fraction", "test/accuracy", "test/length_balanced_accuracy",
    "test/rejected_kind=wrong/accuracy", "reward_start", "reward_final", "gold_score_final", "artifact_rate_start",
    "artifact_rate_final", "drawn_q1", "drawn_q4", "primary_effect", "primary_ci_seeds", "frontier_gap_correct",
    "meanshift_gap_correct", "temperature_value_tokens", "temperature_free_start_tokens", "eval_mean_temperature",
    "eval_coverage", "val_accuracy_start/", "val_accuracy_final/", "accuracy_start", "accuracy_final",
    "invalid_share_final", "policy_accuracy", "best_fixed_accuracy",
)
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary -->", "<!-- /summary -->"


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device=None):
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device) if device is not None else "unknown",
        "world_size": get_world_size(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _short(value):
    """A summary cell: 4 significant digits, enough to read at a glance."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return _fmt(value)


def _table(rows):
    if not rows:
        return "(none)\n"
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def headline_keys(metrics):
    """The keys of metrics that HEADLINE_METRICS names, in its order ("x/" names every "x/..." key)."""
    keys = []
    for name in HEADLINE_METRICS:
        keys += [k for k in metrics if k.startswith(name)] if name.endswith("/") else [name] * (name in metrics)
    return keys


def render_section(stage, metrics, timings, flags, device=None, notes=None, charts=(), chart_dir=""):
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    command = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    headline = "; ".join(f"{key} {_short(metrics[key])}" for key in headline_keys(metrics))
    parts = [f"## {stage}\n", f"<!-- headline: {headline} -->",
             f"_written {time.strftime('%Y-%m-%d %H:%M:%S')} by `{command}`_\n"]
    parts += [f"![{os.path.splitext(name)[0]}]({chart_dir}{name})\n" for name in charts]
    if notes:
        parts.append(notes.strip() + "\n")
    parts += ["### Metrics\n", _table(metrics), "### Timings\n", _table(timings),
              "### Flags\n", _table(flags), "### Environment\n", _table(environment(device))]
    return "\n".join(parts)


def write_report(stage_dir, metrics, timings=None, flags=None, device=None, notes=None, charts=()):
    """
    Write `<stage_dir>/report.md` and replace or append the stage's section in the report beside it
    (`outs/sft/` -> `outs/report.md`). The stage's name is the directory's name. `charts` are image files in
    stage_dir, shown at the top of both (linked relative to each file).
    """
    if not is_master():
        return None
    stage_dir = os.path.abspath(stage_dir)
    stage, out_root = os.path.basename(stage_dir), os.path.dirname(stage_dir)
    section = render_section(stage, metrics, timings or {}, flags or {}, device, notes, charts)
    atomic_write(os.path.join(stage_dir, "report.md"), section)
    begin, end = f"<!-- stage:{stage} -->", f"<!-- /stage:{stage} -->"
    whole_section = render_section(stage, metrics, timings or {}, flags or {}, device, notes, charts, f"{stage}/")
    block = f"{begin}\n{whole_section}{end}\n"
    whole_path = os.path.join(out_root, "report.md")
    whole = "# nanochat-kat report\n\n"
    if os.path.exists(whole_path):
        with open(whole_path, encoding="utf-8") as f:
            whole = f.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n", re.S)
    whole = pattern.sub(lambda _: block, whole, count=1) if pattern.search(whole) else whole + block + "\n"
    atomic_write(whole_path, with_summary(whole))
    return section


def with_summary(whole):
    """The whole report with its summary table (one row per stage section, in order) rebuilt after the title."""
    rows = [f"| [{stage}](#{stage}) | {headline} |" for stage, headline in
            re.findall(r"<!-- stage:(\S+) -->\n## \S+\n\n<!-- headline: (.*?) -->", whole)]
    summary = "\n".join([SUMMARY_BEGIN, "## Summary\n", "| stage | headline numbers |", "|---|---|", *rows,
                         SUMMARY_END]) + "\n\n"
    whole = re.sub(re.escape(SUMMARY_BEGIN) + r".*?" + re.escape(SUMMARY_END) + r"\n\n", "", whole, flags=re.S)
    title, _, rest = whole.partition("\n\n")
    return f"{title}\n\n{summary}{rest}"
