"""
Training-history charts: one PNG per stage with a panel per concept, every series against step.

A history is a list of dicts, one per logged step: {"step": 10, "train/loss": 2.1, "val/bpb": 1.2, ...}. Keys are
wandb-style "group/name" (the name may itself hold slashes, as DPO's "train/rewards/chosen"); a step may lack
keys that others carry (validation runs every N steps), and a key's missing, non-numeric, NaN or inf values are
skipped, so its line joins the steps where it has a finite value.

Grouping rule (`panels`): a key's words are the lowercase alphanumeric runs of its name (the part after the first
"/"). The first concept that has a word starting with one of its stems takes the key:

    loss           loss                      train/loss, train/pg_loss, val/loss
    accuracy       acc, correct              val/accuracy, train/rewards/accuracies, eval/correct
    reward         reward, score, margin     train/reward, train/reward_std, eval/gold_score, val/mean_margin
    KL             kl                        train/kl
    grad norm      grad                      train/grad_norm
    learning rate  lr, learning              train/lr, train/lrm, train/learning_rate

Accuracy and reward get separate panels because accuracies are shares in [0, 1] while rewards and margins are
unbounded: on one axis the accuracy line would be flat. Any other key goes into a panel shared with the keys of
the same metric family, the first "/" segment of its name (train/bpb with val/bpb, train/logps/chosen with
train/logps/rejected). Panels come in the order above, then families alphabetically; keys within a panel sorted.
"""

import math
import numbers
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nanochat.common import atomic_path

CONCEPTS = [("loss", ("loss",)), ("accuracy", ("acc", "correct")), ("reward", ("reward", "score", "margin")),
            ("KL", ("kl",)), ("grad norm", ("grad",)), ("learning rate", ("lr", "learning"))]
COLUMNS = 3
MARKER_MAX_POINTS = 50  # beyond this, markers would hide the line


def _name(key):
    return key.split("/", 1)[-1]


def panel_title(key):
    """The concept of `key` (a CONCEPTS title), or else its metric family (the first segment of its name)."""
    words = re.findall(r"[a-z0-9]+", _name(key).lower())
    for title, stems in CONCEPTS:
        if any(word.startswith(stems) for word in words):
            return title
    return _name(key).split("/")[0]


def panels(keys):
    """Metric keys grouped into panels (lists of keys) by the module docstring's rule; "step" and key order ignored."""
    groups = {}
    for key in sorted(set(keys) - {"step"}):
        groups.setdefault(panel_title(key), []).append(key)
    concepts = [title for title, _ in CONCEPTS if title in groups]
    families = sorted(title for title in groups if title not in concepts)
    return [groups[title] for title in concepts + families]


def _series(history):
    """{key: (steps, values)} of the finite numeric values of every key but "step"."""
    series = {}
    for row in history:
        for key, value in row.items():
            if key == "step" or not isinstance(value, numbers.Real) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(float(value))
    return series


def plot_history(history, path, title):
    """Draw `history` (per-step metric dicts) as a PNG at `path`, atomically; the path, or None if none is numeric."""
    series = _series(history)
    if not series:
        return None
    groups = panels(series)
    cols = min(COLUMNS, len(groups))
    rows = math.ceil(len(groups) / cols)
    # fixed size and dpi (no bbox_inches="tight"), so a stage's chart has the same pixel size on every run
    width, height = 4.5 * cols, 3 * rows + 0.6
    fig = Figure(figsize=(width, height), dpi=100)
    # margins in inches fit the tick labels whatever the grid; a layout engine would cost a second draw
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.8 / height,
                        wspace=0.3, hspace=0.45)
    fig.suptitle(title)
    # one step axis for all panels, so a validation point lines up with the training curve beside it
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).flat
    for keys, ax in zip(groups, axes):  # groups first: zip then leaves the unused axes in the iterator
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) <= MARKER_MAX_POINTS else None, markersize=3,
                    linewidth=1.2, label=key)
        # a lone series is named in the title; several share the concept title and get a legend
        ax.set_title(keys[0] if len(keys) == 1 else panel_title(keys[0]), fontsize=10)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on short runs
        ax.tick_params(labelsize=7, labelbottom=True)  # sharex hides inner panels' step labels; keep them
        ax.grid(alpha=0.3)
    for ax in axes:  # the unused cells of the last row
        ax.axis("off")
    return save_png(fig, path)


def save_png(fig, path):
    """Render a matplotlib Figure with Agg into a PNG at `path`, atomically (temp file, then rename); the path."""
    FigureCanvasAgg(fig)  # headless, and no pyplot: no global figure registry to leak into or close
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temp name ends in .tmp, so name the format
    return path
