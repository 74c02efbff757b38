"""
Tests for nanochat/diversity.py and scripts/kat_eval_diversity.py: every metric on hand-made texts against values
worked out by hand or by a naive reference (a plain sliding window for MATTR, the mean-absolute-difference form of
the Gini coefficient, explicit rebuilding of a resampled corpus), pattern regexes on positives and on words that
contain their parts, verdict signs per direction, the bootstrap, and the script end to end on tiny random models.
"""

import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from nanochat import diversity as dv
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, config_from_depth
from nanochat.pairs import extract_prompts, read_pairs
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


def planted_responses(n=40, k=3):
    """SFT writes em-dashes everywhere; the density-aware run drops them on the first half (the rare prompts), the
    uniform run nowhere. Every response differs, so the diversity metrics are defined."""
    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(300)]

    def text(dash):
        body = " ".join(rng.choice(words, rng.integers(4, 12)))
        return f"The answer is {body}" + ("\u2014plain and simple." if dash else ".")

    sft = [[text(True) for _ in range(k)] for _ in range(n)]
    density = [[text(i >= n // 2) for _ in range(k)] for i in range(n)]
    baseline = [[text(True) for _ in range(k)] for _ in range(n)]
    return {"sft": sft, "density": density, "baseline": baseline}


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
    responses = planted_responses()
    quantile = np.repeat([0, 1, 2, 3], 10)  # first half of the prompts: q1 and q2
    rewards = {m: {"reward": np.full((40, 3), 1.0 if m == "density" else 0.0)} for m in responses}
    results = dv.collect_metrics(responses, rewards, quantile, num_resamples=300, seed=0, reference="sft",
                                 contrast=("density", "baseline"))
    assert [m["key"] for m in results["metrics"]][:2] == ["reward", "artifact_rate"]
    everything = results["comparisons"]["all"]
    assert everything["em_dash"]["density-sft"]["verdict"] == "✅"
    assert everything["em_dash"]["density-sft"]["delta"] == pytest.approx(-0.5)
    assert everything["em_dash"]["baseline-sft"]["verdict"] == "≈"  # identical rates, CI [0, 0]
    assert everything["reward"]["density-baseline"]["verdict"] == "✅"
    assert results["comparisons"]["q4"]["em_dash"]["density-baseline"]["delta"] == 0
    rv = results["rare_vs_dense"]
    assert (rv["rare"], rv["dense"], rv["n_rare"]) == ("q1", "q4", 10)
    assert rv["rows"]["artifact_rate"]["density-baseline@rare"]["delta"] == -1.0
    assert rv["rows"]["artifact_rate"]["density-baseline@gap"]["verdict"] == "✅"
    assert "the density-aware model did significantly better than the uniform model on rare prompts" in rv["answer"]
    report = dv.render_report(results)
    for section in ("## Summary (all prompts)", "## Rare vs dense prompts", "### q1 (sparsest): 10 prompts",
                    "### q4 (densest): 10 prompts", "**Answer (planted-artifact rate"):
        assert section in report
    assert "−1 [−1, −1] ✅" in report


def test_collect_metrics_is_deterministic_and_needs_aligned_models():
    responses = planted_responses(n=8, k=2)
    roles = {"reference": "sft", "contrast": ("density", "baseline")}
    first = dv.collect_metrics(responses, num_resamples=100, seed=1, **roles)
    assert dv.collect_metrics(responses, num_resamples=100, seed=1, **roles) == first
    assert first["rare_vs_dense"] is None
    with pytest.raises(ValueError, match="same 8 prompts"):
        dv.collect_metrics({**responses, "baseline": responses["baseline"][:7]}, num_resamples=10)
    with pytest.raises(ValueError, match=r"unknown models \['baseline'\]"):
        dv.collect_metrics({"sft": responses["sft"], "density": responses["density"]}, num_resamples=10, **roles)


def test_write_charts_draws_both_charts_as_pngs(tmp_path):
    # catches charts skipped silently (the old "no matplotlib" path) and a save that is not a PNG or leaves temp files
    quantile = np.repeat([0, 1, 2, 3], 10)
    results = dv.collect_metrics(planted_responses(), quantile=quantile, num_resamples=20, seed=0, reference="sft",
                                 contrast=("density", "baseline"))
    paths = dv.write_charts(results, str(tmp_path / "report"))
    assert paths == [str(tmp_path / "report_summary.png"), str(tmp_path / "report_quantiles.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report_quantiles.png", "report_summary.png"]
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_quantiles = dv.collect_metrics(planted_responses(n=8, k=2), num_resamples=10)
    assert dv.write_charts(no_quantiles, str(tmp_path / "x")) == [str(tmp_path / "x_summary.png")]


# -----------------------------------------------------------------------------
# the script on tiny random models

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diversity")
    world = make_world(0, 1)
    tok = train_tokenizer(iter(world.pretrain_documents(40, seed=0)), 300)
    tok.save(root / "outs" / "tokenizer")
    for seed, name in enumerate(("sft", "grpo_density", "grpo_baseline", "dpo_density")):
        torch.manual_seed(seed)
        model = GPT(config_from_depth(2, tok.vocab_size, 128, n_embd=64, n_head=4, verbose=False)).eval()
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised projections would make every model alike
                p.normal_(0, 0.3)
        # a stage's own --seed is not its world's: the world comes from the checkpoint's record
        save_checkpoint(root / "outs" / name, model, 0, root / "outs" / "tokenizer", flags={"seed": 7},
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


FLAGS = ["--num_prompts", "8", "--samples_per_prompt", "2", "--max_new_tokens", "12", "--num_resamples", "200"]
TWO_RUNS = "density=outs/grpo_density,baseline=outs/grpo_baseline"  # the default set without SFT


def test_script_writes_the_report_and_sidecar(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "outs/missing_rm.pt"])
    out = capsys.readouterr().out
    assert "no reward model" in out and "wrote .cache/diversity_report.md" in out
    report = (run_dir / ".cache" / "diversity_report.md").read_text()
    for section in ("## Summary (all prompts)", "## Rare vs dense prompts", "**Answer (planted-artifact rate",
                    "### q1 (sparsest): 2 prompts", "### q4 (densest): 2 prompts", "## Sample responses",
                    "| SFT | density-aware | uniform |", "the reward metric is skipped",
                    "8 of 8 prompts are its questions"):
        assert section in report, section
    data = strict_json(run_dir / ".cache" / "diversity_report.json")
    keys = [m["key"] for m in data["metrics"]]
    assert "reward" not in keys and "gold_score" in keys and "gini" in keys
    assert data["rare_vs_dense"]["answer"].startswith("On the sparsest density quantile (q1, 2 prompts)")
    assert [p["quantile"] for p in data["prompts"]].count("q1") == 2
    assert all(len(r) == 8 and all(len(s) == 2 for s in r) for r in data["responses"].values())
    assert data["world"] == {"seed": 0, "size": 1}


def test_script_with_reward_and_without_sft(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--output_report", "with_rm/report.md"])
    with_rm = strict_json(run_dir / "with_rm" / "report.json")
    assert "reward" in [m["key"] for m in with_rm["metrics"]]
    assert "density-sft" in with_rm["comparisons"]["all"]["reward"]
    # a reference whose checkpoint does not exist is left out (as SFT was), not an error
    kat_eval_diversity.main(FLAGS + ["--output_report", "no_sft/report.md", "--models", "sft=outs/no_sft," + TWO_RUNS,
                                     "--headline_metric", "reward"])
    no_sft = strict_json(run_dir / "no_sft" / "report.json")
    assert no_sft["models"] == ["density", "baseline"] and no_sft["reference"] is None
    assert "no reference model (outs/no_sft not found): no SFT column and no changes from it" in no_sft["notes"]
    assert no_sft["rare_vs_dense"]["answer"].startswith(
        "On the sparsest density quantile (q1, 2 prompts) the reward-model reward is compared between the "
        "density-aware and uniform models directly")
    assert "the reward metric" not in (run_dir / "no_sft" / "report.md").read_text()
    # the same seed gives the two runs the same samples whatever else is in the run
    for key in ("gini", "mattr", "em_dash", "gold_score", "reward"):
        for model in ("density", "baseline"):
            assert no_sft["values"]["all"][key][model] == with_rm["values"]["all"][key][model]


def test_script_names_a_missing_model(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    with pytest.raises(SystemExit, match="--models baseline=outs/nothing: checkpoint not found: outs/nothing/ckpt.pt"):
        kat_eval_diversity.main(FLAGS + ["--models", "sft=outs/sft,density=outs/grpo_density,baseline=outs/nothing"])


def test_script_reads_densities_that_cover_the_prompts(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    prompts, _ = extract_prompts(read_pairs(".cache/data/pairs_test.jsonl")[0])
    density_file = run_dir / "density.jsonl"
    # planted: the i-th prompt has density i + 1, so the first two are the sparsest quartile
    density_file.write_text("".join(json.dumps({"prompt_id": p["id"], "density": i + 1.0, "weight": 1.0}) + "\n"
                                    for i, p in enumerate(prompts[:8])))
    common = FLAGS + ["--models", TWO_RUNS, "--rm_ckpt_path", "", "--density_path", str(density_file)]
    kat_eval_diversity.main(common + ["--output_report", "read/report.md"])
    data = strict_json(run_dir / "read" / "report.json")
    assert [p["quantile"] for p in data["prompts"]] == ["q1", "q1", "q2", "q2", "q3", "q3", "q4", "q4"]
    assert [p["density"] for p in data["prompts"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert any(note.startswith(f"densities read from {density_file}") for note in data["notes"])
    kat_eval_diversity.main(common + ["--output_report", "partial/report.md", "--num_prompts", "9"])
    data = strict_json(run_dir / "partial" / "report.json")
    assert any("does not cover the evaluated prompts" in note for note in data["notes"])
    assert len(data["prompts"]) == 9


def test_script_never_evaluates_training_prompts(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    rows = (run_dir / ".cache" / "data" / "pairs_test.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "train_pairs.jsonl").write_text("".join(rows[:3]))
    payload = torch.load(run_dir / "outs" / "grpo_density" / "ckpt.pt", weights_only=True)
    payload["flags"]["pairs_path"] = "train_pairs.jsonl"
    shutil.copytree(run_dir / "outs" / "grpo_density" / "tokenizer", run_dir / "outs" / "grpo_trained" / "tokenizer")
    torch.save(payload, run_dir / "outs" / "grpo_trained" / "ckpt.pt")
    kat_eval_diversity.main(FLAGS + ["--models", "density=outs/grpo_trained,baseline=outs/grpo_baseline",
                                     "--rm_ckpt_path", "", "--output_report", "trained/report.md"])
    data = strict_json(run_dir / "trained" / "report.json")
    trained = {json.loads(row)["prompt_id"] for row in rows[:3]}
    assert len(data["prompts"]) == 8 and not trained & {p["id"] for p in data["prompts"]}
    assert f"{len(trained)} prompts skipped: a compared model trained on them (its --pairs_path)" in data["notes"]


def test_script_says_where_the_charts_are(run_dir, monkeypatch, capsys):
    # catches charts written somewhere the printout (and so the user) does not point to
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--output_report", "charts/report.md"])
    assert "charts: charts/report_summary.png, charts/report_quantiles.png" in capsys.readouterr().out
    assert (run_dir / "charts" / "report_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "charts" / "report_quantiles.png").read_bytes()[:4] == b"\x89PNG"


def test_script_compares_any_named_models_against_a_reference_and_a_contrast(run_dir, monkeypatch):
    # catches: a name-bound path (a comparison, label or role still tied to sft/density/baseline) and a contrast
    # taken the wrong way round; the expectation is the default run's density − uniform, negated
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--output_report", "trio/report.md"])
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--output_report", "named/report.md",
                                     "--models", "a=outs/sft,b=outs/grpo_density", "--models",
                                     "c=outs/grpo_baseline,d=outs/dpo_density", "--reference", "a",
                                     "--contrast", "c,b"])
    trio, named = strict_json(run_dir / "trio" / "report.json"), strict_json(run_dir / "named" / "report.json")
    assert (named["models"], named["reference"], named["contrast"]) == (["a", "b", "c", "d"], "a", ["c", "b"])
    assert list(named["comparisons"]["all"]["gini"]) == ["b-a", "c-a", "d-a", "c-b"]
    assert "| a | b | c | d | b − a | c − a | d − a | c − b |" in (run_dir / "named" / "report.md").read_text()
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
    assert "The difference c − b there is" in named["rare_vs_dense"]["answer"]


def test_script_without_a_contrast_says_so(run_dir, monkeypatch):
    # catches: a set without density and baseline failing, or silently inventing a headline pair
    monkeypatch.chdir(run_dir)
    kat_eval_diversity.main(FLAGS + ["--rm_ckpt_path", "", "--num_resamples", "20", "--output_report",
                                     "pair/report.md", "--models", "x=outs/grpo_density,y=outs/dpo_density"])
    data = strict_json(run_dir / "pair" / "report.json")
    assert (data["models"], data["reference"], data["contrast"]) == (["x", "y"], None, None)
    assert data["comparisons"]["all"]["gini"] == {} and data["rare_vs_dense"] is None
    assert any(note.startswith("no contrast (--contrast A,B)") for note in data["notes"])
    report = (run_dir / "pair" / "report.md").read_text()
    assert "**Answer" not in report and "| x | y |" in report


@pytest.mark.parametrize("flags,message", [
    (["--contrast", "a,z"], "--contrast: z is not one of the models (a, b)"),
    (["--reference", "y"], "--reference: y is not one of the models (a, b)"),
    (["--contrast", "a,a"], "--contrast: 'a,a' is not A,B with two different models"),
])
def test_script_refuses_unknown_names_before_loading(run_dir, monkeypatch, capsys, flags, message):
    # catches: a mistyped name that silently drops the reference or contrast (a report without its headline)
    monkeypatch.chdir(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        kat_eval_diversity.main(FLAGS + ["--models", "a=outs/sft,b=outs/grpo_density"] + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_refuses_models_of_two_worlds(run_dir, monkeypatch):
    # catches: gold scored in the first model's world for a model that learnt another one
    monkeypatch.chdir(run_dir)
    payload = torch.load(run_dir / "outs" / "grpo_baseline" / "ckpt.pt", weights_only=True)
    payload["world"] = {"seed": 1, "size": 1}
    shutil.copytree(run_dir / "outs" / "grpo_baseline" / "tokenizer", run_dir / "outs" / "world1" / "tokenizer")
    torch.save(payload, run_dir / "outs" / "world1" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"sft \(outs/sft/ckpt.pt\) learnt the synthetic world \{'seed': 0, 'size': "
                                         r"1\}, other \(outs/world1/ckpt.pt\) the world \{'seed': 1, 'size': 1\}"):
        kat_eval_diversity.main(FLAGS + ["--models", "sft=outs/sft,density=outs/grpo_density,other=outs/world1"])
