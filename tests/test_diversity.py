"""
Tests for nanochat/diversity.py and scripts/kat_eval_diversity.py: every metric on hand-made texts against values
worked out by hand or by a naive reference (a plain sliding window for MATTR, the mean-absolute-difference form of
the Gini coefficient, explicit rebuilding of a resampled corpus), pattern regexes on positives and on words that
contain their parts, verdict signs per direction, the bootstrap (paired over prompts), Student-t quantiles against
the tables, intervals across seeds against hand-computed ones, degenerate flags, the order of the report (the
pre-registered primary outcome first), and the script end to end on tiny random models with several seeds per arm.
"""

import json
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from nanochat import diversity as dv
from nanochat.checkpoint import load_payload, load_tokenizer, save_checkpoint
from nanochat.common import InputError
from nanochat.density import QUARTILES, read_heldout_densities
from nanochat.gpt import GPT, config_from_depth
from nanochat.pairs import extract_prompts, heldout_sample, read_pairs
from nanochat.rm import RewardModel
from nanochat.synthetic import make_world
from nanochat.tokenizer import train_tokenizer
from scripts import kat_eval_diversity


# -----------------------------------------------------------------------------
# metrics of texts

def test_word_tokens():
    assert dv.word_tokens("It’s NOT a guess—it's 42, don't_x!") == ["it's", "not", "a", "guess", "it's", "42",
                                                                     "don't", "x"]
    assert dv.word_tokens("Café au lait") == ["café", "au", "lait"]


def test_gini_uniform_is_zero_and_known_values_by_hand():
    assert dv.gini(Counter(dv.word_tokens("red blue green red blue green")).values()) == 0.0
    # sorted 1, 1, 1, 5: 2 * (1 + 2 + 3 + 20) / (4 * 8) - 5 / 4 = 0.375
    assert dv.gini([5, 1, 1, 1]) == pytest.approx(0.375)
    assert dv.gini([0, 5, 1, 0, 1, 1]) == pytest.approx(0.375)  # unseen types are not part of the vocabulary
    assert dv.gini([1] * 99 + [100_000]) > 0.98
    assert math.isnan(dv.gini([]))


def test_gini_equals_mean_absolute_difference_form():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(1, 50, size=rng.integers(2, 30)).astype(float)
        reference = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
        assert dv.gini(x) == pytest.approx(reference)


def test_em_dashes_are_counted_apart_from_en_dashes_and_hyphens():
    text = "Red\u2014plain and simple. Pages 3\u20135 are well-known \u2014 and -- not dashes\u2014"
    assert dv.count_em_dashes(text) == 3
    assert dv.count_en_dashes(text) == 1
    features = dv.model_features([[text, "No dashes here at all."]])
    num, den = features["ratio"]["em_dash_1k"]
    words = len(dv.word_tokens(text)) + 5
    assert num[0] / den[0] == pytest.approx(1000 * 3 / words)
    num, den = features["ratio"]["em_dash"]
    assert num[0] / den[0] == 1.5


@pytest.mark.parametrize("text,name", [
    ("It's not just an answer, but a fact worth knowing.", "not_just_but"),
    ("This is not only true, but also easy to remember.", "not_just_but"),
    ("Music is not merely sound but a language.", "not_just_but"),
    ("He was not angry, but he was tired.", "not_x_but_y"),
    ("The point is not speed, but care.", "not_x_but_y"),
    ("It's not a guess, it's a fact.", "its_not_x_its_y"),
    ("That's not a rumour, that's the truth.", "its_not_x_its_y"),
    ("This is not a bug \u2014 it's a feature.", "its_not_x_its_y"),
    ("It isn't luck. It's practice.", "its_not_x_its_y"),
    ("It\u2019s not magic; it is method.", "its_not_x_its_y"),
])
def test_each_pattern_fires_on_its_phrase_and_only_it(text, name):
    counts = dv.pattern_counts(text)
    assert counts[name] == 1
    assert sum(counts.values()) == 1, counts


@pytest.mark.parametrize("text", [
    "The attribute of the button is set.",
    "Nothing but the truth.",
    "I would go, but not today.",
    "You cannot just leave, but you may stay.",
    "A knot, but a loose one.",
    "Notably, but quietly, it works.",
    "It's nothing, it's fine.",
    "It's not true. But it's close.",
    "The rebuttal is not just a button",
    "Not a chance.",
])
def test_patterns_do_not_fire_inside_words_or_on_lookalikes(text):
    assert dv.pattern_counts(text) == {name: 0 for name in dv.PATTERNS}


def test_distinct_n_and_repeated_ngrams_by_hand():
    lists = [["a", "b", "a", "b"], ["a", "b", "c"]]
    assert dv.distinct_n(lists, 1) == pytest.approx(3 / 7)
    assert dv.distinct_n(lists, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc: n-grams never cross two lists
    assert dv.distinct_n(lists, 3) == 1.0  # aba bab | abc
    assert math.isnan(dv.distinct_n([["a"]], 2))
    assert dv.repeated_ngrams(dv.word_tokens("the cat the cat the cat"), 3) == 2  # 4 trigrams, 2 distinct
    assert dv.repeated_ngrams(["a", "b"], 3) == 0
    assert dv.type_token_ratio(["a", "b", "a", "c"]) == 0.75


def test_mattr_equals_a_naive_sliding_window_and_controls_for_length():
    rng = np.random.default_rng(1)
    for length in (1, 7, 49, 50, 51, 120, 333):
        tokens = [f"w{i}" for i in rng.integers(0, 25, length)]
        window = 50
        if length >= window:
            naive = np.mean([len(set(tokens[s:s + window])) / window for s in range(length - window + 1)])
        else:
            naive = len(set(tokens)) / length
        assert dv.mattr(tokens, window) == pytest.approx(naive)
    once = [f"w{i}" for i in range(200)]
    assert dv.type_token_ratio(once + once) == 0.5  # TTR halves when a corpus is said twice
    assert dv.mattr(once + once) == dv.mattr(once) == 1.0


def test_response_stats():
    assert dv.response_stats("Hello there. How are you?\nFine!") == {"words": 6, "chars": 31, "sentences": 3}
    assert dv.response_stats("3.5 is a number") == {"words": 5, "chars": 15, "sentences": 1}
    assert dv.response_stats("") == {"words": 0, "chars": 0, "sentences": 0}


# -----------------------------------------------------------------------------
# bootstrap and verdicts

def test_verdict_signs_follow_the_direction():
    assert dv.verdict((0.1, 0.3), +1) == "✅"
    assert dv.verdict((-0.3, -0.1), +1) == "❌"
    assert dv.verdict((-0.3, -0.1), -1) == "✅"
    assert dv.verdict((0.1, 0.3), -1) == "❌"
    assert dv.verdict((-0.1, 0.2), +1) == dv.verdict((-0.1, 0.2), -1) == "≈"
    assert dv.verdict((0.1, 0.3), 0) == "—"
    assert dv.verdict((math.nan, math.nan), 1) == "n/a"


def test_half_samples_never_repeat_a_prompt():
    idx = dv.resample_indices(9, 50, seed=0)
    assert idx.shape == (50, 4)
    assert all(len(set(row)) == 4 for row in idx.tolist())
    assert np.array_equal(idx, dv.resample_indices(9, 50, seed=0))
    assert dv.resample_indices(1, 3, seed=0).tolist() == [[0], [0], [0]]


def test_bootstrap_ci_of_a_mean():
    values = np.array([0.0, 1.0] * 50)
    point, lo, hi = dv.bootstrap_ci(values, num_resamples=2000, seed=3)
    assert point == 0.5 and lo < 0.5 < hi
    # the half-sample mean spreads by sqrt(0.25 * (1/50 - 1/100)) = 0.5 / sqrt(100), the full mean's standard
    # error: normal approximation 0.5 +- 1.96 * 0.05
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert dv.bootstrap_ci(values, num_resamples=2000, seed=3) == (point, lo, hi)
    assert dv.bootstrap_ci(values, num_resamples=2000, seed=4) != (point, lo, hi)
    median = dv.bootstrap_ci(lambda idx: np.median(values[idx], axis=1), n=len(values), num_resamples=500)
    assert median[0] == 0.5


WORDS = [f"word{i}" for i in range(300)]


def planted_responses(n=40, k=3):
    """SFT writes em-dashes everywhere; the density-aware run drops them on the first half (the rare prompts), the
    uniform run nowhere. Every response differs, so the diversity metrics are defined."""
    rng = np.random.default_rng(0)

    def text(dash):
        body = " ".join(rng.choice(WORDS, rng.integers(4, 12)))
        return f"The answer is {body}" + ("\u2014plain and simple." if dash else ".")

    sft = [[text(True) for _ in range(k)] for _ in range(n)]
    density = [[text(i >= n // 2) for _ in range(k)] for i in range(n)]
    baseline = [[text(True) for _ in range(k)] for _ in range(n)]
    return {"sft": sft, "density": density, "baseline": baseline}


def one_run(responses, seed=0):
    """{model: {seed: responses}}: each model one training run."""
    return {model: {seed: r} for model, r in responses.items()}


def texts_with_rate(rate, seed, n=8):
    """n prompts x 1 sample, the first rate * n of them with a planted em dash (an artifact); words drawn by seed."""
    rng = np.random.default_rng(seed)
    return [[f"The answer is {' '.join(rng.choice(WORDS, 6))}" + ("\u2014plain." if i < rate * n else ".")]
            for i in range(n)]


def test_resampled_statistics_equal_the_metric_on_the_rebuilt_corpus():
    responses = planted_responses()["density"]
    features = dv.model_features(responses)
    idx = np.random.default_rng(5).integers(0, len(responses), size=(3, len(responses)))
    for row, stats in zip(idx, zip(*(dv.statistic(features, key, idx) for key in dv.CORPUS_KEYS + ("em_dash_1k",)))):
        corpus = [text for i in row for text in responses[i]]  # the resampled corpus, in resample order
        tokens = [dv.word_tokens(t) for t in corpus]
        flat = [t for ts in tokens for t in ts]
        expected = [dv.gini(Counter(flat).values()), dv.distinct_n(tokens, 1), dv.mattr(flat),
                    dv.distinct_n(tokens, 2), dv.distinct_n(tokens, 3),
                    1000 * sum(dv.count_em_dashes(t) for t in corpus) / len(flat)]
        assert stats == pytest.approx(expected)


def test_collect_metrics_finds_the_planted_change_on_rare_prompts():
    responses = one_run(planted_responses())
    quantile = np.repeat([0, 1, 2, 3], 10)  # first half of the prompts: q1 and q2
    rewards = {m: {0: {"reward": np.full((40, 3), 1.0 if m == "density" else 0.0)}} for m in responses}
    results = dv.collect_metrics(responses, rewards, quantile, num_resamples=300, seed=0, reference="sft",
                                 contrast=("density", "baseline"), quantile_basis="training")
    assert [m["key"] for m in results["metrics"]][:2] == ["reward", "artifact_rate"]
    everything = results["comparisons"]["all"]
    assert everything["em_dash"]["density-sft"]["verdict"] == "✅"
    assert everything["em_dash"]["density-sft"]["delta"] == pytest.approx(-0.5)
    assert everything["em_dash"]["baseline-sft"]["verdict"] == "≈"  # identical rates, CI [0, 0]
    assert everything["em_dash"]["baseline-sft"]["degenerate"] == ["zero-width evaluation CI"]
    assert everything["reward"]["density-baseline"]["verdict"] == "✅"
    assert everything["reward"]["density-baseline"]["identical"] == 0.0
    assert results["comparisons"]["q4"]["em_dash"]["density-baseline"]["delta"] == 0
    rv = results["rare_vs_dense"]
    assert (rv["rare"], rv["dense"], rv["n_rare"]) == ("q1", "q4", 10)
    assert rv["rows"]["artifact_rate"]["density-baseline@rare"]["delta"] == -1.0
    assert rv["rows"]["artifact_rate"]["density-baseline@gap"]["verdict"] == "✅"
    assert rv["answer"].startswith("On the sparsest density quantile (q1, 10 prompts), density-aware − uniform")
    primary = results["primary"]
    assert (primary["metric"], primary["subset"], primary["n_prompts"]) == ("artifact_rate", "q1", 10)
    assert primary["inference"] == "evaluation noise only" and primary["verdict"] == "✅"
    assert primary["interval"]["seeds"]["pairing"] == "single" and primary["interval"]["delta"] == -1.0
    assert list(primary["self_distinct"]) == ["self_distinct_1", "self_distinct_2", "self_distinct_3"]
    assert list(primary["self_distinct"]["self_distinct_2"]) == ["q1", "all"]
    assert ("the density-aware runs had a significantly lower planted-artifact rate (share of responses) than the "
            "uniform runs on q1 (10 prompts) (over evaluation noise only)") in primary["answer"]
    assert "CI across seeds: n/a (1 seed)" in primary["answer"]
    assert "covers evaluation noise only" in primary["answer"]
    report = dv.render_report(results)
    for section in ("## Primary outcome (pre-registered)", "## Exploratory: summary (all prompts)",
                    "## Exploratory: rare vs dense prompts", "### q1 (sparsest): 10 prompts",
                    "### q4 (densest): 10 prompts", "**planted-artifact rate (share of responses):** On the sparsest",
                    "every verdict covers evaluation noise only"):
        assert section in report, section
    assert "−1 [−1, −1] ✅ ⚠" in report  # every rare prompt moved by exactly −1: a real effect, a zero-width CI
    # the multiple-comparisons note: 16 metrics with a direction (reward, no gold) x 3 differences x (5 prompt sets +
    # the gap), one evaluation verdict each, none across seeds (one run each): ~5% of 288 by chance
    assert "Its tables hold 288 verdicts (288 over evaluation noise, 0 across seeds)" in report
    assert "~14, would come out ✅ or ❌ by chance" in report


def test_collect_metrics_is_deterministic_and_needs_aligned_models():
    responses = one_run(planted_responses(n=8, k=2))
    roles = {"reference": "sft", "contrast": ("density", "baseline")}
    first = dv.collect_metrics(responses, num_resamples=100, seed=1, **roles)
    assert dv.collect_metrics(responses, num_resamples=100, seed=1, **roles) == first
    assert first["rare_vs_dense"] is None
    assert first["primary"]["measured"] is False and "no density quantiles" in first["primary"]["answer"]
    with pytest.raises(ValueError, match="same 8 prompts"):
        dv.collect_metrics({**responses, "baseline": {0: responses["baseline"][0][:7]}}, num_resamples=10)
    with pytest.raises(ValueError, match="same 8 prompts"):  # every run, not only the first of each model
        dv.collect_metrics({**responses, "baseline": {0: responses["baseline"][0], 1: responses["sft"][0][:7]}},
                           num_resamples=10)
    with pytest.raises(ValueError, match=r"unknown models \['baseline'\]"):
        dv.collect_metrics({"sft": responses["sft"], "density": responses["density"]}, num_resamples=10, **roles)


def test_write_charts_draws_both_charts_as_pngs(tmp_path):
    # catches charts skipped silently (the old "no matplotlib" path) and a save that is not a PNG or leaves temp files
    quantile = np.repeat([0, 1, 2, 3], 10)
    results = dv.collect_metrics(one_run(planted_responses()), quantile=quantile, num_resamples=20, seed=0,
                                 reference="sft", contrast=("density", "baseline"))
    paths = dv.write_charts(results, str(tmp_path / "report"))
    assert paths == [str(tmp_path / "report_summary.png"), str(tmp_path / "report_quantiles.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report_quantiles.png", "report_summary.png"]
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_quantiles = dv.collect_metrics(one_run(planted_responses(n=8, k=2)), num_resamples=10)
    assert dv.write_charts(no_quantiles, str(tmp_path / "x")) == [str(tmp_path / "x_summary.png")]


# -----------------------------------------------------------------------------
# the two sources of variance: prompts (paired bootstrap) and training seeds (Student t)

def test_evaluation_ci_is_paired_over_prompts_for_every_run():
    # catches: half-samples drawn independently per model (or per run). Per-prompt em-dash counts vary a lot on both
    # sides but move together, so the paired difference has a small spread; an unpaired bootstrap adds both sides'
    # prompt-to-prompt spread (a mutant drawing half-samples per model gives a CI ~5x wider and fails here)
    rng = np.random.default_rng(0)
    n = 60
    dashes = rng.integers(0, 6, n)  # per prompt, shared by both arms: the spread that pairing cancels
    extra = (rng.random(n) < 0.2).astype(int)  # the uniform arm adds one on about a fifth of the prompts

    def run(counts, seed):
        words = np.random.default_rng(seed)
        return [[" ".join(words.choice(WORDS, 8)) + " \u2014" * c for _ in range(2)] for c in counts]

    responses = {"density": {0: run(dashes, 1), 1: run(dashes, 2)},
                 "baseline": {0: run(dashes + extra, 3), 1: run(dashes + extra, 4)}}
    results = dv.collect_metrics(responses, num_resamples=2000, seed=0, contrast=("density", "baseline"))
    iv = results["comparisons"]["all"]["em_dash"]["density-baseline"]
    d = -extra.astype(float)
    paired = 2 * 1.96 * d.std() / math.sqrt(n)  # the half-sample mean spreads like the full mean: sigma / sqrt(n)
    unpaired = 2 * 1.96 * math.sqrt(dashes.var() + (dashes + extra).var()) / math.sqrt(n)
    assert unpaired > 4 * paired  # the fixture tells the two apart
    assert iv["delta"] == pytest.approx(d.mean())
    assert iv["hi"] - iv["lo"] == pytest.approx(paired, rel=0.25)
    assert iv["se"] == pytest.approx(d.std() / math.sqrt(n), rel=0.15)
    assert iv["mde"] == pytest.approx((1.960 + 0.842) * iv["se"], rel=1e-3)


@pytest.mark.parametrize("df,p,table", [(1, 0.975, 12.706), (2, 0.975, 4.303), (4, 0.975, 2.776),
                                        (10, 0.975, 2.228), (30, 0.975, 2.042), (2, 0.80, 1.061),
                                        (4, 0.80, 0.941), (1e6, 0.975, 1.960), (math.inf, 0.975, 1.960),
                                        (math.inf, 0.80, 0.842)])
def test_t_quantile_matches_the_tables(df, p, table):
    # catches: a normal quantile used for small df (1.96 where 4.303 belongs: CIs across 3 seeds 2x too narrow), a
    # one-sided quantile, or a CDF that is wrong away from 0
    assert dv.t_quantile(p, df) == pytest.approx(table, abs=1e-3)
    assert dv.t_quantile(1 - p, df) == pytest.approx(-table, abs=1e-3)
    if math.isfinite(df):
        assert dv.t_cdf(dv.t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_seed_interval_by_hand_paired_by_seed_value_welch_and_against_one_run():
    # catches: runs paired by position instead of by seed (a glob's order is not a pairing), Welch's df or standard
    # error wrong, and a single reference run treated as if it had seed variance
    a = {0: 0.5, 1: 0.25, 2: 0.75}
    b = {0: 0.25, 1: 0.25, 2: 0.5}
    paired = dv.seed_interval(a, b, -1)
    # effects 0.25, 0, 0.25: mean 1/6, deviations 1/12, -1/6, 1/12, sd sqrt((2/144 + 4/144) / 2)
    sd = math.sqrt((2 / 144 + 4 / 144) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert paired["pairing"] == "paired" and paired["df"] == 2
    assert paired["effects"] == pytest.approx({0: 0.25, 1: 0.0, 2: 0.25})
    assert [paired["mean"], paired["lo"], paired["hi"]] == pytest.approx([1 / 6, 1 / 6 - half, 1 / 6 + half],
                                                                         abs=1e-3)
    assert paired["mde"] == pytest.approx((4.303 + 1.061) * sd / math.sqrt(3), abs=1e-3)
    assert paired["verdict"] == "≈"
    shuffled = dv.seed_interval(a, {2: 0.5, 0: 0.25, 1: 0.25}, -1)
    for key in ("effects", "mean", "se", "lo", "hi", "mde"):
        assert shuffled[key] == pytest.approx(paired[key])
    # different seeds: Welch. var_a / n_a = 0.02 / 2, var_b / n_b = 0.04 / 3
    welch = dv.seed_interval({0: 0.1, 1: 0.3}, {2: 0.2, 3: 0.6, 4: 0.4}, +1)
    va, vb = 0.01, 0.04 / 3
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    assert welch["pairing"] == "welch" and welch["effects"] is None
    assert welch["se"] == pytest.approx(math.sqrt(va + vb)) and welch["df"] == pytest.approx(df)
    assert welch["hi"] == pytest.approx(-0.2 + dv.t_quantile(0.975, df) * math.sqrt(va + vb))
    # one SFT run against three seeds: a one-sample t over the three differences, 2 df
    fixed = dv.seed_interval(a, {7: 0.25}, -1)
    assert fixed["pairing"] == "fixed_b" and fixed["df"] == 2
    assert fixed["effects"] == pytest.approx({0: 0.25, 1: 0.0, 2: 0.5})
    single = dv.seed_interval({0: 0.5}, {0: 0.25}, -1)
    assert single["pairing"] == "single" and single["verdict"] == "n/a" and math.isnan(single["lo"])


def test_collect_metrics_infers_across_seeds_from_each_runs_value():
    # catches: an arm's value that is not the mean of its runs, seeds paired by the order the runs come in, and a
    # seed interval built from something other than the per-run values on the prompt set
    seeds = iter(range(100))
    a = {s: texts_with_rate(rate, next(seeds)) for s, rate in ((0, 0.5), (1, 0.25), (2, 0.75))}
    b = {s: texts_with_rate(rate, next(seeds)) for s, rate in ((0, 0.25), (1, 0.25), (2, 0.5))}
    results = dv.collect_metrics({"density": a, "baseline": b}, num_resamples=200, contrast=("density", "baseline"))
    assert results["runs"] == {"density": [0, 1, 2], "baseline": [0, 1, 2]}
    assert results["values"]["all"]["artifact_rate"] == pytest.approx({"density": 0.5, "baseline": 1 / 3})
    assert results["run_values"]["all"]["artifact_rate"]["density"] == {0: 0.5, 1: 0.25, 2: 0.75}
    iv = results["comparisons"]["all"]["artifact_rate"]["density-baseline"]
    expected = dv.seed_interval({0: 0.5, 1: 0.25, 2: 0.75}, {0: 0.25, 1: 0.25, 2: 0.5}, -1)
    for key in ("effects", "mean", "se", "lo", "hi", "mde"):
        assert iv["seeds"][key] == pytest.approx(expected[key])
    assert iv["delta"] == pytest.approx(1 / 6) and iv["identical"] == 0.0 and iv["degenerate"] == []
    reordered = dv.collect_metrics({"density": a, "baseline": {2: b[2], 0: b[0], 1: b[1]}}, num_resamples=200,
                                   contrast=("density", "baseline"))
    again = reordered["comparisons"]["all"]["artifact_rate"]["density-baseline"]
    for key in ("mean", "lo", "hi"):
        assert again["seeds"][key] == pytest.approx(iv["seeds"][key])


def test_identical_responses_are_flagged_degenerate_not_reported_as_a_precise_null():
    # catches: two arms with byte-identical responses (the same checkpoint twice, or a policy that never moved)
    # shown as "0 [0, 0] ≈", which reads as a precisely measured null
    planted = planted_responses(n=16, k=2)
    runs = {0: planted["baseline"], 1: planted["sft"]}
    results = dv.collect_metrics({"density": runs, "baseline": dict(runs)}, quantile=np.repeat([0, 1, 2, 3], 4),
                                 num_resamples=100, contrast=("density", "baseline"), quantile_basis="training")
    iv = results["primary"]["interval"]
    assert iv["delta"] == 0 and iv["identical"] == 1.0
    assert iv["degenerate"] == ["zero-width evaluation CI", "zero-width CI across seeds",
                                "byte-identical responses on 100% of samples"]
    assert results["identical"]["q1"]["density-baseline"] == {"share": 1.0, "runs": {"0/0": 1.0, "1/1": 1.0}}
    report = dv.render_report(results)
    primary = report[:report.index("## Exploratory results")]
    assert "⚠ Degenerate: zero-width evaluation CI; zero-width CI across seeds; byte-identical responses on 100%" \
        in primary
    assert "not a precise estimate (nor, at 0, a precise null)" in primary
    assert "Byte-identical responses between the arms on q1: 100% (runs 0/0: 100%, 1/1: 100%)." in primary
    zero = [line for line in report.splitlines() if line.startswith("|") and "[0, 0]" in line]
    assert zero and all("⚠" in line for line in zero)


def test_equal_effects_in_every_seed_give_no_verdict_not_a_significant_one():
    # catches: a zero-width across-seed interval (each seed's effect the same, as the positive control's three seeds
    # were: -3 artifacted responses of 104 each) read as "significantly lower": it excludes 0 without measuring
    # anything, so the primary answer must say undecided
    density = {s: texts_with_rate(rate, 10 + s, n=16) for s, rate in ((0, 0.25), (1, 0.5))}
    baseline = {s: texts_with_rate(rate, 20 + s, n=16) for s, rate in ((0, 0.5), (1, 0.75))}
    results = dv.collect_metrics({"density": density, "baseline": baseline}, quantile=np.tile([0, 1, 2, 3], 4),
                                 num_resamples=100, contrast=("density", "baseline"), quantile_basis="training")
    primary = results["primary"]
    assert primary["interval"]["seeds"]["lo"] == primary["interval"]["seeds"]["hi"] < 0
    assert "zero-width CI across seeds" in primary["interval"]["degenerate"]
    assert primary["verdict"] == "⚠" and "undecided on q1" in primary["answer"]
    assert "significantly" not in primary["answer"]


# -----------------------------------------------------------------------------
# the report: primary outcome first, then the exploratory part with its multiple-comparisons note

def test_report_states_the_primary_outcome_before_any_number():
    # catches: the run's header, notes or a table printed before the pre-registered statement, so a reader meets
    # numbers (and may pick one) before being told which one decides the question
    seeds = iter(range(100))
    planted = {s: texts_with_rate(rate, next(seeds), n=16) for s, rate in ((0, 0.5), (1, 0.25))}
    responses = {"sft": {7: texts_with_rate(0.5, 99, n=16)}, "density": planted,
                 "baseline": {s: texts_with_rate(0.75, next(seeds), n=16) for s in (0, 1)}}
    results = dv.collect_metrics(responses, quantile=np.tile([0, 1, 2, 3], 4), num_resamples=50, reference="sft",
                                 contrast=("density", "baseline"), quantile_basis="training")
    report = dv.render_report(results, header="_written 2025-01-01 by `kat_eval_diversity --num_prompts=16`_",
                              notes=["3 prompts skipped"], training_mix={},
                              examples=[{"prompt": "Q 1", "subset": "q1", "responses": {"sft": "A 2"}}])
    heading = report.index("## Primary outcome (pre-registered)")
    assert heading < re.search(r"\d", report).start()
    statement = report[heading:report.index("**Answer:**")]
    for words in ("planted-artifact rate (share of responses) (lower is better) of the density-aware model minus "
                  "the uniform model on the sparsest density quartile, q1", "density against the training prompts",
                  "inferred across training seeds", "95% Student-t confidence interval"):
        assert words in statement, words
    assert "not rare in training" not in report
    order = [report.index(s) for s in ("**Answer:**", "| **planted-artifact rate", "## Run", "Notes:",
                                       "## Exploratory results", "## Exploratory: summary")]
    assert order == sorted(order)
    assert "Per-seed effects: seed 0: " in report and "(Student t, 1 df)" in report
    # 15 metrics with a direction x 3 differences x (5 prompt sets + the gap) = 270 intervals over evaluation noise
    # and 270 across seeds (two seeds per arm, or against the one SFT run); the fixture's fixed template gives 166
    # of the latter the same effect in every seed, undecided (⚠), which count as no test
    assert "Its tables hold 374 verdicts (270 over evaluation noise, 104 across seeds)" in report
    assert sum(line.count("] ⚠") for line in report.splitlines() if line.startswith("|")) >= 166
    assert "~19, would come out ✅ or ❌ by chance" in report
    assert ("Across seeds: density-aware − SFT: each of the 2 density-aware runs against the one SFT run, whose own "
            "seed variance is not measured; uniform − SFT: each of the 2 uniform runs against the one SFT run, whose "
            "own seed variance is not measured; density-aware − uniform: paired by seed, 2 seeds.") in report
    # the within-prompt distinct-n beside the primary, on q1 and on all prompts
    table = report[report.index("| **planted-artifact rate"):report.index("## Run")].split("\n\n")[0]
    assert [line.split(" | ")[1] for line in table.splitlines()] == ["q1 (4)"] + ["q1 (4)", "all (16)"] * 3
    assert table.count("| distinct-2 across a prompt's samples ↑ |") == 2


def test_report_warns_when_rare_is_not_rare_in_training():
    # catches: quartiles of the evaluated prompts' own densities presented as if they were training quartiles
    results = dv.collect_metrics(one_run(planted_responses(n=8, k=2)), quantile=np.repeat([0, 1, 2, 3], 2),
                                 num_resamples=20, contrast=("density", "baseline"), quantile_basis="evaluated")
    report = dv.render_report(results)
    assert "⚠ **Here q1 is not rare in training.**" in report
    assert report.index("not rare in training") < report.index("**Answer:**")


# -----------------------------------------------------------------------------
# the script on tiny random models

RUNS = {"sft": 7, "grpo_density_s0": 0, "grpo_density_s1": 1, "grpo_baseline_s0": 0, "grpo_baseline_s1": 1,
        "dpo_density": 7}  # directory: the seed its checkpoint records


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diversity")
    world = make_world(0, 1)
    tok = train_tokenizer(iter(world.pretrain_documents(40, seed=0)), 300)
    tok.save(root / "outs" / "tokenizer")
    for init, (name, seed) in enumerate(RUNS.items()):
        torch.manual_seed(init)
        model = GPT(config_from_depth(2, tok.vocab_size, 128, n_embd=64, n_head=4, verbose=False)).eval()
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised projections would make every model alike
                p.normal_(0, 0.3)
        # a stage's own --seed is not its world's: the world comes from the checkpoint's record
        save_checkpoint(root / "outs" / name, model, 0, root / "outs" / "tokenizer", flags={"seed": seed},
                        world={"seed": 0, "size": 1})
    rm = RewardModel(GPT(config_from_depth(2, tok.vocab_size, 128, n_embd=64, n_head=4, verbose=False)))
    with torch.no_grad():
        for p in rm.parameters():
            p.normal_(0, 0.3)
    save_checkpoint(root / "outs" / "rm", rm, 0, root / "outs" / "tokenizer", kind="rm", extra={"max_len": 128},
                    world={"seed": 0, "size": 1})
    rows = world.preference_pairs(40, 1)
    (root / ".cache" / "data").mkdir(parents=True)
    (root / ".cache" / "data" / "pairs_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def strict_json(path):
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def all_prompts(run_dir):
    return extract_prompts(read_pairs(run_dir / ".cache" / "data" / "pairs_test.jsonl")[0])[0]


FLAGS = ["--num_prompts", "8", "--samples_per_prompt", "2", "--max_new_tokens", "12", "--num_resamples", "200"]
TWO_RUNS = "density=outs/grpo_density_s0,baseline=outs/grpo_baseline_s0"  # one run per arm, no SFT


def test_script_writes_the_report_and_sidecar(run_dir, monkeypatch, capsys):
    # catches: globbed runs not all sampled, runs not paired by their recorded seeds, the primary outcome's numbers
    # missing from the sidecar, and prompts taken from the top of the file instead of a sample by source
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "outs/missing_rm.pt"])
    out = capsys.readouterr().out
    assert "no reward model" in out and "wrote outs/diversity/diversity_report.md" in out and "Primary outcome: " in out
    report = (run_dir / "outs" / "diversity" / "diversity_report.md").read_text()
    for section in ("## Primary outcome (pre-registered)", "## Exploratory: summary (all prompts)",
                    "## Exploratory: rare vs dense prompts", "**planted-artifact rate (share of responses):**",
                    "### q1 (sparsest): 2 prompts", "### q4 (densest): 2 prompts", "## Sample responses",
                    "| SFT | density-aware | uniform |", "the reward metric is skipped",
                    "8 of 8 prompts are its questions", "| density-aware | 1 | `outs/grpo_density_s1/ckpt.pt` | 0 |",
                    "⚠ **Here q1 is not rare in training.**", "Per-seed effects: seed 0: "):
        assert section in report, section
    # the stage's section joins the run's report, with the primary outcome and a link to the whole report
    whole = (run_dir / "outs" / "report.md").read_text()
    assert "<!-- stage:diversity -->" in whole and "**Primary outcome:**" in whole
    assert "[diversity_report.md](diversity_report.md)" in (run_dir / "outs" / "diversity" / "report.md").read_text()
    data = strict_json(run_dir / "outs" / "diversity" / "diversity_report.json")
    assert data["runs"] == {"sft": [7], "density": [0, 1], "baseline": [0, 1]}
    assert [c["path"] for c in data["checkpoints"]["density"]] == ["outs/grpo_density_s0/ckpt.pt",
                                                                  "outs/grpo_density_s1/ckpt.pt"]
    keys = [m["key"] for m in data["metrics"]]
    assert "reward" not in keys and "gold_score" in keys and "gini" in keys
    primary = data["primary"]
    assert (primary["metric"], primary["subset"], primary["contrast"]) == ("artifact_rate", "q1", ["density",
                                                                                                  "baseline"])
    assert primary["quantile_basis"] == "evaluated" and primary["inference"] == "across seeds"
    seeds = primary["interval"]["seeds"]
    assert seeds["pairing"] == "paired" and list(seeds["effects"]) == ["0", "1"] and seeds["df"] == 1
    assert [p["quantile"] for p in data["prompts"]].count("q1") == 2
    assert all(set(runs) == {str(s) for s in data["runs"][name]} for name, runs in data["responses"].items())
    assert all(len(r) == 8 and all(len(s) == 2 for s in r) for runs in data["responses"].values()
               for r in runs.values())
    assert data["world"] == {"seed": 0, "size": 1}
    tok = load_tokenizer(load_payload("outs/sft"))
    usable = [p for p in all_prompts(run_dir) if len(tok.render_for_completion(p["messages"])) + 12 <= 128]
    assert f"8 of the {len(usable)} usable prompts, sampled by source (heldout_sample, seed 0)" in data["notes"]
    assert [p["id"] for p in data["prompts"]] == [p["id"] for p in heldout_sample(usable, 8, 0)]
    assert [p["id"] for p in data["prompts"]] != [p["id"] for p in usable[:8]]


def test_script_with_reward_and_without_sft(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--out_dir", "with_rm"])
    with_rm = strict_json(run_dir / "with_rm" / "diversity_report.json")
    assert "reward" in [m["key"] for m in with_rm["metrics"]]
    assert "density-sft" in with_rm["comparisons"]["all"]["reward"]
    # a reference whose checkpoint does not exist is left out (as SFT was), not an error
    kat_eval_diversity.main(FLAGS + ["--out_dir", "no_sft", "--models", "sft=outs/no_sft," + TWO_RUNS,
                                     "--primary_metric", "reward"])
    no_sft = strict_json(run_dir / "no_sft" / "diversity_report.json")
    assert no_sft["models"] == ["density", "baseline"] and no_sft["reference"] is None
    assert "no reference model (outs/no_sft not found): no SFT column and no changes from it" in no_sft["notes"]
    assert no_sft["primary"]["metric"] == "reward" and no_sft["primary"]["inference"] == "evaluation noise only"
    assert no_sft["rare_vs_dense"]["answer"].startswith(
        "On the sparsest density quantile (q1, 2 prompts), density-aware − uniform in the reward-model reward")
    assert "the reward metric" not in (run_dir / "no_sft" / "diversity_report.md").read_text()
    # the same seed gives a run the same samples whatever else is in the report
    for key in ("gini", "mattr", "em_dash", "gold_score", "reward"):
        for model in ("density", "baseline"):
            assert no_sft["run_values"]["all"][key][model]["0"] == with_rm["run_values"]["all"][key][model]["0"]


def test_script_refuses_a_primary_metric_it_cannot_measure(run_dir, monkeypatch):
    # catches: the pre-registered metric quietly swapped for another when it is not measured
    monkeypatch.chdir(run_dir)
    with pytest.raises(SystemExit, match="--primary_metric=reward needs the reward model"):
        kat_eval_diversity.main(FLAGS + ["--models", TWO_RUNS, "--rm_ckpt_path", "", "--primary_metric", "reward"])


def test_script_names_a_missing_model_a_pattern_that_matches_nothing_and_clashing_seeds(run_dir, monkeypatch):
    # catches: an arm silently smaller than asked (a typo in a glob) and two runs of one arm with one seed, which
    # cannot be paired with the other arm's
    monkeypatch.chdir(run_dir)
    with pytest.raises(SystemExit, match="--models baseline=outs/nothing: checkpoint not found: outs/nothing/ckpt.pt"):
        kat_eval_diversity.main(FLAGS + ["--models", "sft=outs/sft,density=outs/grpo_density_s0,baseline=outs/nothing"])
    with pytest.raises(SystemExit, match=r"--models density=outs/grpo_dens_s\*: the pattern matches no run"):
        kat_eval_diversity.main(FLAGS + ["--models", "density=outs/grpo_dens_s*,baseline=outs/grpo_baseline_s0"])
    with pytest.raises(SystemExit, match=r"record the seeds \[0, 0\]; the runs of an arm need distinct"):
        kat_eval_diversity.main(FLAGS + ["--models", "density=outs/grpo_*_s0,baseline=outs/grpo_baseline_s1"])


def write_density_test(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_script_takes_quartiles_from_the_density_files_field(run_dir, monkeypatch):
    # catches: quartiles recomputed among the evaluated prompts when the file gives each prompt's TRAINING quartile:
    # the planted quartiles run against the densities' order, so re-quantiling would move every prompt
    monkeypatch.chdir(run_dir)
    prompts = all_prompts(run_dir)
    planted = {p["id"]: (i + 1.0, QUARTILES[3 - i % 4]) for i, p in enumerate(prompts)}
    density_file = write_density_test(run_dir / "density_test.jsonl", [
        {"prompt_id": pid, "density": d, "knn_mean_distance": 1 / d, "quartile": q} for pid, (d, q) in planted.items()])
    common = FLAGS + ["--models", TWO_RUNS, "--rm_ckpt_path", "", "--density_path", density_file]
    kat_eval_diversity.main(common + ["--out_dir", "read"])
    data = strict_json(run_dir / "read" / "diversity_report.json")
    assert [(p["density"], p["quantile"]) for p in data["prompts"]] == [planted[p["id"]] for p in data["prompts"]]
    assert data["quantile_basis"] == data["primary"]["quantile_basis"] == "training"
    assert any(note.startswith(f"densities and quartiles read from {density_file}") for note in data["notes"])
    assert "not rare in training" not in (run_dir / "read" / "diversity_report.md").read_text()
    # a file that misses some evaluated prompts: computed among them, and the report says "rare" is not training's
    write_density_test(run_dir / "partial.jsonl", [
        {"prompt_id": pid, "density": d, "knn_mean_distance": 1 / d, "quartile": q}
        for pid, (d, q) in list(planted.items())[:5]])
    kat_eval_diversity.main(common[:-1] + ["partial.jsonl", "--out_dir", "partial"])
    data = strict_json(run_dir / "partial" / "diversity_report.json")
    assert data["quantile_basis"] == "evaluated"
    assert any(note.startswith("⚠ 'rare' means rare among the evaluated prompts, not in training: partial.jsonl "
                               "covers ") for note in data["notes"])
    assert "⚠ **Here q1 is not rare in training.**" in (run_dir / "partial" / "diversity_report.md").read_text()


@pytest.mark.parametrize("row,message", [
    ({"prompt_id": "b", "density": 2.0, "knn_mean_distance": 0.5, "quartile": "q5"},
     "line 2: field 'quartile' must be one of q1, q2, q3, q4, got 'q5'"),
    ({"prompt_id": "b", "density": "2", "knn_mean_distance": 0.5, "quartile": "q1"},
     "line 2: field 'density' must be a finite number >= 0, got '2'"),
    ({"prompt_id": "b", "density": 2.0, "quartile": "q1"}, "line 2: missing field 'knn_mean_distance'"),
    ({"prompt_id": "a", "density": 2.0, "knn_mean_distance": 0.5, "quartile": "q1"}, "line 2: prompt_id 'a' appears"),
])
def test_script_names_the_bad_line_of_a_density_file(tmp_path, row, message):
    # catches: a broken density file read as if fine (a missing quartile becoming q1) or failing with a traceback
    path = write_density_test(tmp_path / "density_test.jsonl", [
        {"prompt_id": "a", "density": 1.0, "knn_mean_distance": 1.0, "quartile": "q2"}, row])
    with pytest.raises(InputError, match=re.escape(f"{path} {message}")):
        read_heldout_densities(path)


def test_script_shows_the_prompts_each_arm_drew(run_dir, monkeypatch):
    # catches: the arms' training mix averaged wrongly (counts instead of shares, runs of one arm mixed into the
    # other) and a missing drawn_prompts.json failing the report instead of being noted
    monkeypatch.chdir(run_dir)
    drawn = {"grpo_density_s0": (100, 50, [40, 30, 20, 10], {"rare": 40, "common": 60}),
             "grpo_density_s1": (200, 70, [100, 40, 40, 20], {"rare": 120, "common": 80}),
             "grpo_baseline_s0": (100, 80, [25, 25, 25, 25], {"common": 100})}  # grpo_baseline_s1 has none
    try:
        for name, (draws, distinct, quartiles, clusters) in drawn.items():
            (run_dir / "outs" / name / "drawn_prompts.json").write_text(json.dumps(
                {"draws": draws, "distinct_prompts": distinct, "by_quartile": dict(zip(QUARTILES, quartiles)),
                 "by_cluster": clusters}))
        kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--num_resamples", "20", "--out_dir",
                                         "mix"])
    finally:
        for name in drawn:
            (run_dir / "outs" / name / "drawn_prompts.json").unlink()
    mix = strict_json(run_dir / "mix" / "diversity_report.json")["training_mix"]
    assert (mix["density"]["runs"], mix["density"]["missing"], mix["density"]["draws"]) == (2, [], 150)
    assert mix["density"]["distinct_prompts"] == 60
    assert mix["density"]["by_quartile"] == pytest.approx({"q1": 0.45, "q2": 0.25, "q3": 0.2, "q4": 0.1})
    assert mix["density"]["by_cluster"] == pytest.approx({"common": 0.5, "rare": 0.5})
    assert mix["baseline"]["missing"] == ["outs/grpo_baseline_s1"] and mix["baseline"]["by_cluster"] == {"common": 1}
    report = (run_dir / "mix" / "diversity_report.md").read_text()
    assert "## Prompts each arm drew in training" in report
    assert "| density-aware | 2 of 2 | 150 | 60 | 45.0% | 25.0% | 20.0% | 10.0% | 50.0% | 50.0% |" in report
    assert "| uniform | 1 of 2 | 100 | 80 | 25.0% | 25.0% | 25.0% | 25.0% | 100.0% | 0.0% |" in report
    assert "No drawn_prompts.json in outs/grpo_baseline_s1: those runs are left out of the means." in report


def test_script_never_evaluates_training_prompts(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    rows = (run_dir / ".cache" / "data" / "pairs_test.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "train_pairs.jsonl").write_text("".join(rows[:3]))
    payload = torch.load(run_dir / "outs" / "grpo_density_s0" / "ckpt.pt", weights_only=True)
    payload["flags"]["pairs_path"] = "train_pairs.jsonl"
    shutil.copytree(run_dir / "outs" / "grpo_density_s0" / "tokenizer", run_dir / "outs" / "grpo_trained" / "tokenizer")
    torch.save(payload, run_dir / "outs" / "grpo_trained" / "ckpt.pt")
    kat_eval_diversity.main(FLAGS + ["--models", "density=outs/grpo_trained,baseline=outs/grpo_baseline_s0",
                                     "--rm_ckpt_path", "", "--out_dir", "trained"])
    data = strict_json(run_dir / "trained" / "diversity_report.json")
    trained = {json.loads(row)["prompt_id"] for row in rows[:3]}
    assert len(data["prompts"]) == 8 and not trained & {p["id"] for p in data["prompts"]}
    assert f"{len(trained)} prompts skipped: a compared model trained on them (its --pairs_path)" in data["notes"]


def test_script_says_where_the_charts_are(run_dir, monkeypatch, capsys):
    # catches charts written somewhere the printout (and so the user) does not point to
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--models", TWO_RUNS, "--rm_ckpt_path", "", "--out_dir", "charts"])
    charts = "charts/diversity_report_summary.png, charts/diversity_report_quantiles.png"
    assert f"charts: {charts}" in capsys.readouterr().out
    assert (run_dir / "charts" / "diversity_report_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "charts" / "diversity_report_quantiles.png").read_bytes()[:4] == b"\x89PNG"


def test_script_compares_any_named_models_against_a_reference_and_a_contrast(run_dir, monkeypatch):
    # catches: a name-bound path (a comparison, label or role still tied to sft/density/baseline) and a contrast
    # taken the wrong way round; the expectation is the three-model run's density − uniform, negated
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--out_dir", "trio",
                                     "--models", "sft=outs/sft," + TWO_RUNS])
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--out_dir", "named",
                                     "--models", "a=outs/sft,b=outs/grpo_density_s0", "--models",
                                     "c=outs/grpo_baseline_s0,d=outs/dpo_density", "--reference", "a",
                                     "--contrast", "c,b"])
    trio = strict_json(run_dir / "trio" / "diversity_report.json")
    named = strict_json(run_dir / "named" / "diversity_report.json")
    assert (named["models"], named["reference"], named["contrast"]) == (["a", "b", "c", "d"], "a", ["c", "b"])
    assert list(named["comparisons"]["all"]["gini"]) == ["b-a", "c-a", "d-a", "c-b"]
    table_head = "| a | b | c | d | b − a | c − a | d − a | c − b |"
    assert table_head in (run_dir / "named" / "diversity_report.md").read_text()
    flipped = {"✅": "❌", "❌": "✅"}
    for subset in trio["subsets"]:
        for key, row in trio["comparisons"][subset].items():
            assert named["comparisons"][subset][key]["b-a"] == row["density-sft"]
            forward, backward = row["density-baseline"], named["comparisons"][subset][key]["c-b"]
            assert [backward["delta"], backward["lo"], backward["hi"]] == pytest.approx(
                [-forward["delta"], -forward["hi"], -forward["lo"]], nan_ok=True)
            assert backward["verdict"] == flipped.get(forward["verdict"], forward["verdict"])
    rows = named["rare_vs_dense"]["rows"]["artifact_rate"]
    assert rows["c-b@gap"]["delta"] == pytest.approx(-trio["rare_vs_dense"]["rows"]["artifact_rate"][
        "density-baseline@gap"]["delta"])
    assert "c − b in the planted-artifact rate" in named["rare_vs_dense"]["answer"]
    assert named["primary"]["interval"]["delta"] == pytest.approx(-trio["primary"]["interval"]["delta"])


def test_script_without_a_contrast_says_so(run_dir, monkeypatch):
    # catches: a set without density and baseline failing, or silently inventing a primary pair
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--num_resamples", "20", "--out_dir",
                                     "pair", "--models", "x=outs/grpo_density_s0,y=outs/dpo_density"])
    data = strict_json(run_dir / "pair" / "diversity_report.json")
    assert (data["models"], data["reference"], data["contrast"]) == (["x", "y"], None, None)
    assert data["comparisons"]["all"]["gini"] == {} and data["rare_vs_dense"] is None
    assert data["primary"]["measured"] is False
    assert any(note.startswith("no contrast (--contrast A,B)") for note in data["notes"])
    report = (run_dir / "pair" / "diversity_report.md").read_text()
    assert "**Answer" not in report and "| x | y |" in report and "Not measured: no contrast" in report


@pytest.mark.parametrize("flags,message", [
    (["--contrast", "a,z"], "--contrast: z is not one of the models (a, b)"),
    (["--reference", "y"], "--reference: y is not one of the models (a, b)"),
    (["--contrast", "a,a"], "--contrast: 'a,a' is not A,B with two different models"),
])
def test_script_refuses_unknown_names_before_loading(run_dir, monkeypatch, capsys, flags, message):
    # catches: a mistyped name that silently drops the reference or contrast (a report without its primary outcome)
    monkeypatch.chdir(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        kat_eval_diversity.main(FLAGS + ["--models", "a=outs/sft,b=outs/grpo_density_s0"] + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_refuses_models_of_two_worlds(run_dir, monkeypatch):
    # catches: gold scored in the first model's world for a model that learnt another one
    monkeypatch.chdir(run_dir)
    payload = torch.load(run_dir / "outs" / "grpo_baseline_s0" / "ckpt.pt", weights_only=True)
    payload["world"] = {"seed": 1, "size": 1}
    shutil.copytree(run_dir / "outs" / "grpo_baseline_s0" / "tokenizer", run_dir / "outs" / "world1" / "tokenizer")
    torch.save(payload, run_dir / "outs" / "world1" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"sft \(outs/sft/ckpt.pt\) learnt the synthetic world \{'seed': 0, 'size': "
                                         r"1\}, other \(outs/world1/ckpt.pt\) the world \{'seed': 1, 'size': 1\}"):
        kat_eval_diversity.main(FLAGS + ["--models", "sft=outs/sft,density=outs/grpo_density_s0,other=outs/world1"])
