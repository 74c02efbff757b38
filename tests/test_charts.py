"""
Tests for nanochat/charts.py: the grouping rule against hand-written panels, and plot_history on awkward histories
(NaN, inf, single points, validation every few steps, nothing numeric) writing a valid PNG of a fixed size, atomically.
"""

import math

import matplotlib.image
import pytest

from nanochat import charts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


@pytest.fixture
def drawn(monkeypatch):
    """The Figures plot_history saves, to inspect what it drew."""
    figures = []
    real_save = charts.save_png
    monkeypatch.setattr(charts, "save_png", lambda fig, path: figures.append(fig) or real_save(fig, path))
    return figures


def lines_of(fig, key):
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == key]


# -----------------------------------------------------------------------------
# grouping

def test_panels_group_by_concept_then_by_metric_family():
    # catches a rule that groups by the "train/" / "val/" prefix, which would split train/loss from val/loss
    keys = ["train/loss", "val/loss", "train/pg_loss", "val/accuracy", "train/rewards/accuracies", "eval/correct",
            "train/reward", "train/reward_std", "eval/gold_score", "train/rewards/margins", "train/kl",
            "train/grad_norm", "train/lrm", "train/bpb", "val/bpb", "train/logps/chosen", "train/logps/rejected",
            "train/tok_per_s", "eval/n"]
    assert charts.panels(keys) == [
        ["train/loss", "train/pg_loss", "val/loss"],
        ["eval/correct", "train/rewards/accuracies", "val/accuracy"],  # before reward: DPO's rewards/accuracies
        ["eval/gold_score", "train/reward", "train/reward_std", "train/rewards/margins"],
        ["train/kl"],
        ["train/grad_norm"],
        ["train/lrm"],
        ["train/bpb", "val/bpb"],
        ["train/logps/chosen", "train/logps/rejected"],
        ["eval/n"],
        ["train/tok_per_s"],
    ]


def test_panels_match_words_not_substrings():
    # catches substring matching: "kl" inside "weekly", "lr" inside "url_count", "acc" inside "tacc" would misfile
    assert charts.panels(["train/weekly", "train/url_count", "x/tacc"]) == [["x/tacc"], ["train/url_count"],
                                                                          ["train/weekly"]]
    assert charts.panel_title("loss") == "loss" and charts.panel_title("val/KL_div") == "KL"


def test_panels_ignore_step_and_key_order():
    # catches panels that follow dict order, which would reshuffle a stage's chart from one run to the next
    keys = ["val/loss", "step", "train/lr", "train/loss", "train/grad_norm"]
    assert charts.panels(keys) == charts.panels(reversed(keys)) == [["train/loss", "val/loss"], ["train/grad_norm"],
                                                                    ["train/lr"]]


# -----------------------------------------------------------------------------
# plot_history

def test_plot_history_writes_a_png_of_a_fixed_size(tmp_path):
    # catches bbox_inches="tight" or a layout that makes the pixel size depend on the data, and a non-PNG file
    history = [{"step": s, "train/loss": 2 / (s + 1), "train/grad_norm": 1.0, "train/lr": 0.02 * (1 - s / 30),
                "val/bpb": 1.5} for s in range(30)]
    path = charts.plot_history(history, tmp_path / "stage" / "history.png", "stage")
    assert path == tmp_path / "stage" / "history.png"
    assert read_png(path).shape == (660, 1350, 4)  # 4 panels: 3 columns x 2 rows of 4.5 x 3 in, + 0.6 in, 100 dpi
    history[5]["train/loss"] = 1e6  # other values, same panels: same size, so reports don't jump around
    assert read_png(charts.plot_history(history, tmp_path / "other.png", "stage")).shape == (660, 1350, 4)


def test_panels_are_labelled(tmp_path, drawn):
    # catches a shared panel without a legend (train/loss and val/loss indistinguishable) or an unlabelled step axis
    history = [{"step": s, "train/loss": 1.0, "val/loss": 2.0, "train/kl": 0.1} for s in range(3)]
    charts.plot_history(history, tmp_path / "h.png", "labels")
    loss, kl = drawn[-1].axes
    assert loss.get_title() == "loss"
    assert [text.get_text() for text in loss.get_legend().get_texts()] == ["train/loss", "val/loss"]
    assert kl.get_title() == "train/kl" and kl.get_legend() is None  # a lone series is named by its title
    assert loss.get_xlabel() == kl.get_xlabel() == "step"


def test_nan_inf_single_points_and_non_numbers_are_skipped(tmp_path, drawn):
    # catches non-numbers reaching float(), an empty panel for an all-NaN key, and a lone point drawn invisibly
    history = [{"step": 0, "train/loss": math.nan, "train/kl": math.inf, "note": "warmup"},
               {"step": 1, "train/loss": 1.5, "train/kl": 0.1, "val/accuracy": 0.5},
               {"step": 2, "train/loss": -math.inf, "train/kl": 0.2, "train/all_nan": math.nan}]
    assert charts._series(history) == {"train/loss": ([1], [1.5]), "train/kl": ([1, 2], [0.1, 0.2]),
                                       "val/accuracy": ([1], [0.5])}
    read_png(charts.plot_history(history, tmp_path / "h.png", "odd"))
    [line] = lines_of(drawn[-1], "val/accuracy")
    assert line.get_marker() == "o"  # a single point is visible only through its marker


def test_missing_keys_keep_their_own_steps(tmp_path, drawn):
    # catches validation values plotted against their index (0, 1, 2) instead of their step (0, 5, 10)
    history = [{"step": s, "train/loss": 1.0 / (s + 1), **({"val/loss": 2.0 - s / 10} if s % 5 == 0 else {})}
               for s in range(12)]
    assert charts._series(history)["val/loss"] == ([0, 5, 10], [2.0, 1.5, 1.0])
    charts.plot_history(history, tmp_path / "h.png", "every 5")
    [line] = lines_of(drawn[-1], "val/loss")
    assert list(line.get_xdata()) == [0, 5, 10]


@pytest.mark.parametrize("history", [[], [{"step": 0}, {"step": 1, "note": "x"}], [{"step": 0, "a": math.nan}]])
def test_nothing_numeric_returns_none_and_writes_nothing(tmp_path, history):
    # catches a blank chart (or a ZeroDivisionError from a grid of no panels) for a stage that logged nothing
    assert charts.plot_history(history, tmp_path / "h.png", "empty") is None
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_old_chart(tmp_path, monkeypatch):
    # catches saving straight onto the path: a crash mid-save would leave a truncated PNG linked from the report
    path = tmp_path / "h.png"
    charts.plot_history([{"step": 0, "train/loss": 1.0}], path, "first")
    before = path.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(charts.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        charts.plot_history([{"step": 0, "train/loss": 2.0}], path, "second")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["h.png"]

