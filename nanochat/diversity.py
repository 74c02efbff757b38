"""
Mode-collapse metrics over sampled responses, with paired (half-sample) bootstrap confidence intervals over prompts
and a verdict per comparison. scripts/kat_eval_diversity.py samples the models and writes the report; everything
here is a pure function of texts (and of per-response scores passed in), so it works for any text, not only the
synthetic world.

Words are the lowercased runs of letters and digits, an inner apostrophe kept ("don't"; a typographic ’ counts as
'): `word_tokens`. Every metric has a direction: ↑ higher is better, ↓ lower is better, — descriptive (no
verdict).

Per response or per prompt (pooled over the prompts of a set):
- em-dashes (U+2014) per response ↓, and per 1k words ↓ (1000 * em-dashes / words, both summed over the set);
  en-dashes (U+2013) are counted apart and are descriptive: they are ordinary typography (ranges, compounds).
- rhetorical patterns per response ↓, by word-boundary regexes (PATTERNS) that never fire inside a word ("cannot",
  "nothing", "button", "attribute"): "not just/only/merely/simply X ... but Y"; "not X, but Y" (the comma form,
  without the just/only words, so the two never count the same phrase); "it's/that's/this is not X, it's Y" (also
  "isn't"; the second half after , ; : — -- or a sentence end).
- repeated 3-gram share ↓: of the word 3-grams of a response, those that repeat an earlier 3-gram of the same
  response; summed over the set, repeats / 3-grams.
- planted-artifact rate ↓: share of responses where synthetic.count_artifacts finds at least one planted tell (em
  dash, "not just X, but Y", "it's not X, it's Y", stock phrases); a plain regex count, valid on any text.
- distinct-n across a prompt's samples ↑ (n = 1, 2, 3): distinct n-grams / n-grams over the samples of one prompt,
  averaged over prompts; the per-input diversity that mode collapse lowers even when the corpus looks varied.
- quality that must not degrade ↑: the reward model's reward and the world's gold score and correctness (gold only
  for prompts the world knows; a prompt without a score is left out of that metric).
- descriptive —: words and characters per response, words per sentence (sentences split after . ! ? or a newline).

Over the whole corpus of responses (recomputed on every bootstrap resample):
- Gini coefficient of word frequencies ↓: over the observed word types with counts sorted ascending c_1..c_n,
  G = 2 sum_i i c_i / (n sum_i c_i) - (n + 1) / n. 0 when every type occurs equally often, towards 1 when a few
  words take all the mass (collapse). It depends on corpus size, so compare models on the same prompts and samples.
- type-token ratio ↑: word types / word tokens (= corpus distinct-1). It falls as a corpus grows, so a model that
  writes less gets a higher TTR for free; hence also
- MATTR ↑ (moving-average TTR, Covington & McFall 2010): the mean TTR of every window of MATTR_WINDOW consecutive
  words of the concatenated responses (a corpus shorter than a window gets its plain TTR). Length-controlled.
- distinct-2, distinct-3 ↑ (Li et al. 2016): distinct n-grams / n-grams, n-grams taken within each response.

Confidence intervals: a half-sample bootstrap over prompts. A set of prompts (all, or one density quantile) of size
n is resampled `num_resamples` times as floor(n/2) prompts drawn WITHOUT replacement (numpy Generator seeded by
(seed, set)); every model is measured on the same half-samples, so a difference of two models is paired over
prompts. Its CI is the point estimate (the difference on all n prompts) plus the 2.5 and 97.5 percentiles of the
half-sample differences minus their mean. Why half-samples: the variance of a half-sample mean about the full mean is
sigma^2 (1/(n/2) - 1/n) = sigma^2 / n (finite-population correction), the sampling variance of the full-sample mean,
and no prompt is ever repeated. The ordinary with-replacement bootstrap repeats about a third of the prompts, and a
repeated prompt adds tokens but no new types, which shrinks type-based corpus metrics (distinct-n by up to a third)
and their differences: in a simulation (60 prompts x 4 samples, two synthetic models, 100 repetitions) its
percentile intervals of Gini, TTR and distinct-2 differences covered the true difference 0-4% of the time, the
half-sample ones 93-97% (distinct-3, whose difference was tiny, 84%; MATTR and per-prompt means 93-97% either way).
Centering on the point estimate removes the half-size corpus's own shift (a half corpus has a higher TTR); for means
it changes nothing. Rare-versus-dense gaps (difference on the sparsest quantile minus difference on the densest)
combine two independent resamplings, as the two quantiles hold different prompts.

Models are any set of names (identifiers, e.g. sft, dpo_density, star_iter2). The differences taken: every other
model minus the `reference` model (when one is named: how each moved from it), and the `contrast` pair a - b (when
one is named: the headline comparison, e.g. density-aware minus uniform sampling, whose rare-versus-dense gap gets a
plain-language answer).

Verdict of a difference (first - second): ✅ when the CI excludes 0 on the metric's good side, ❌ when it excludes 0
on the bad side, ≈ when it includes 0, — for descriptive metrics.
"""

import math
import re
from collections import Counter

import numpy as np
from matplotlib.figure import Figure

from nanochat.charts import save_png
from nanochat.synthetic import count_artifacts

EM_DASH, EN_DASH = "\u2014", "\u2013"
MATTR_WINDOW = 50
REPEAT_N = 3
# nicer table labels for the names speedrun.sh uses (the post-trained runs by their prompt sampling); any other
# name is its own label
LABELS = {"sft": "SFT", "density": "density-aware", "baseline": "uniform"}

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_JUST = r"(?:just|only|merely|simply)"
_BE = r"\b(?:it|that|this)(?:['\u2019]s|\s+is)\b"
_BE_NOT = r"\b(?:it|that|this)(?:['\u2019]s\s+not|\s+is\s+not|\s+isn['\u2019]t)\b"
PATTERNS = {
    "not_just_but": re.compile(rf"\bnot\s+{_JUST}\b[^.!?\n]{{0,80}}?\bbut\b", re.I),
    "not_x_but_y": re.compile(rf"\bnot\s+(?!{_JUST}\b)[^.!?\n,;]{{1,80}}?,\s*but\b", re.I),
    "its_not_x_its_y": re.compile(_BE_NOT + r"[^.!?\n]{1,80}?(?:[,;:.!?]|\u2014|--)\s*" + _BE, re.I),
}

# key, label, direction (+1 higher is better, -1 lower is better, 0 descriptive), group. Keys of scores passed to
# collect_metrics (reward, gold_score, gold_correct) appear only when given.
METRICS = (
    ("reward", "reward-model reward", +1, "quality"),
    ("gold_score", "gold score (world prompts)", +1, "quality"),
    ("gold_correct", "gold correct (world prompts)", +1, "quality"),
    ("artifact_rate", "planted-artifact rate (share of responses)", -1, "quality"),
    ("em_dash", "em-dashes per response", -1, "style"),
    ("em_dash_1k", "em-dashes per 1k words", -1, "style"),
    ("en_dash", "en-dashes per response (typography)", 0, "style"),
    ("not_just_but", '"not just X but Y" per response', -1, "style"),
    ("not_x_but_y", '"not X, but Y" per response', -1, "style"),
    ("its_not_x_its_y", '"it\'s not X, it\'s Y" per response', -1, "style"),
    ("repeated_3grams", "repeated 3-gram share within a response", -1, "style"),
    ("gini", "Gini of word frequencies (corpus)", -1, "diversity"),
    ("ttr", "type-token ratio (corpus distinct-1)", +1, "diversity"),
    ("mattr", f"MATTR, window {MATTR_WINDOW} (corpus)", +1, "diversity"),
    ("distinct_2", "distinct-2 (corpus)", +1, "diversity"),
    ("distinct_3", "distinct-3 (corpus)", +1, "diversity"),
    ("self_distinct_1", "distinct-1 across a prompt's samples", +1, "diversity"),
    ("self_distinct_2", "distinct-2 across a prompt's samples", +1, "diversity"),
    ("self_distinct_3", "distinct-3 across a prompt's samples", +1, "diversity"),
    ("words", "words per response", 0, "length"),
    ("chars", "characters per response", 0, "length"),
    ("sentence_words", "words per sentence", 0, "length"),
)
SCORE_KEYS = ("reward", "gold_score", "gold_correct")
CORPUS_KEYS = ("gini", "ttr", "mattr", "distinct_2", "distinct_3")
DIRECTION_SIGNS = {1: "↑", -1: "↓", 0: "—"}


# -----------------------------------------------------------------------------
# metrics of texts

def word_tokens(text):
    """Lowercased words of a text: runs of letters and digits, an inner apostrophe kept."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def count_em_dashes(text):
    return text.count(EM_DASH)


def count_en_dashes(text):
    return text.count(EN_DASH)


def pattern_counts(text):
    """{pattern name: non-overlapping matches} for every name of PATTERNS."""
    return {name: len(pattern.findall(text)) for name, pattern in PATTERNS.items()}


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngrams(tokens, n=REPEAT_N):
    """Occurrences of n-grams that repeat an earlier n-gram of the same token list."""
    grams = ngrams(tokens, n)
    return len(grams) - len(set(grams))


def distinct_n(token_lists, n):
    """Distinct n-grams / n-grams, n-grams taken within each list; nan when there is none."""
    grams = [g for tokens in token_lists for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def type_token_ratio(tokens):
    return len(set(tokens)) / len(tokens) if tokens else math.nan


def response_stats(text):
    """{"words", "chars", "sentences"}: a sentence is a piece between . ! ? (+ space) or newline breaks with a word."""
    sentences = [s for s in _SENTENCE_BREAK.split(text.strip()) if word_tokens(s)]
    return {"words": len(word_tokens(text)), "chars": len(text), "sentences": len(sentences)}


def _gini_rows(counts):
    """Gini (see the module docstring) of each row of a (B, V) count array over its nonzero entries; nan if none."""
    c = np.sort(np.asarray(counts, dtype=np.float64), axis=1)
    observed = (c > 0).sum(1)
    # after an ascending sort the zeros come first: the i-th observed type sits at column zeros + i - 1
    ranks = np.arange(1, c.shape[1] + 1)[None, :] - (c.shape[1] - observed)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2 * (ranks * c).sum(1) / (observed * c.sum(1)) - (observed + 1) / observed


def gini(counts):
    """Gini coefficient of frequencies (e.g. Counter(word_tokens(text)).values()): 0 uniform, -> 1 collapsed."""
    return float(_gini_rows(np.asarray(list(counts), dtype=np.float64)[None, :])[0])


def _mattr_ids(ids, window):
    """
    MATTR of an int array, without sliding a window: the sum of the windows' distinct counts is the sum over
    positions j of the number of windows in which j is its token's first occurrence, the window starts s with
    prev(j) < s <= j, j - window < s and s <= L - window (prev(j): the token's previous position, or -1).
    """
    length = len(ids)
    if length == 0:
        return math.nan
    if length <= window:
        return len(np.unique(ids)) / length
    order = np.argsort(ids, kind="stable")  # equal ids stay in position order, so neighbours give prev(j)
    prev = np.full(length, -1)
    same = ids[order[1:]] == ids[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    j = np.arange(length)
    last_start = length - window
    first = np.maximum(np.maximum(prev + 1, j - window + 1), 0)
    windows = np.clip(np.minimum(j, last_start) - first + 1, 0, None)
    return windows.sum() / (window * (last_start + 1))


def _id_array(ids, vocab_size):
    # numpy sorts 16-bit ints stably by radix, ~15x faster than 64-bit ones: MATTR's bootstrap is mostly that sort
    return np.array(ids, dtype=np.uint16 if vocab_size <= 2 ** 16 else np.int64)


def mattr(tokens, window=MATTR_WINDOW):
    """Moving-average type-token ratio; a list shorter than the window gets its plain TTR."""
    vocab = {}
    ids = [vocab.setdefault(t, len(vocab)) for t in tokens]
    return _mattr_ids(_id_array(ids, len(vocab)), window)


# -----------------------------------------------------------------------------
# bootstrap and verdicts

def resample_indices(n, num_resamples, seed):
    """(num_resamples, max(n // 2, 1)) half-samples of n items, each without replacement; Generator seeded by seed."""
    rng = np.random.default_rng(seed)
    return rng.permuted(np.tile(np.arange(n), (num_resamples, 1)), axis=1)[:, :max(n // 2, 1)]


def centered_ci(point, samples, level=0.95):
    """(lo, hi) = point + percentiles of (samples - their mean), ignoring nan samples; (nan, nan) when none is."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples) or not math.isfinite(point):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    lo, hi = point + np.percentile(samples - samples.mean(), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values_or_stat, n=None, num_resamples=1000, seed=0, level=0.95):
    """
    (point, lo, hi) by the half-sample bootstrap: per-item values (1-D) give the CI of their mean; a function
    stat(idx) -> (B,) of a (B, m) index array over n items gives the CI of any statistic (its point estimate is
    stat of all n items).
    """
    if callable(values_or_stat):
        stat = values_or_stat
    else:
        values = np.asarray(values_or_stat, dtype=np.float64)
        n, stat = len(values), lambda idx: values[idx].mean(1)
    point = float(stat(np.arange(n)[None, :])[0])
    return (point, *centered_ci(point, stat(resample_indices(n, num_resamples, seed)), level))


def verdict(ci, direction):
    """✅ CI of a difference (a - b) excludes 0 on the good side, ❌ on the bad side, ≈ includes 0; — descriptive."""
    lo, hi = ci
    if direction == 0:
        return "—"
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if lo > 0 or hi < 0:
        return "✅" if (lo > 0) == (direction > 0) else "❌"
    return "≈"


# -----------------------------------------------------------------------------
# one model's responses -> what its statistics need

def _presence(token_lists_by_prompt, n):
    """
    For distinct-n on any resample: n-grams grouped by the set of prompts they occur in (most occur in one), as a
    (prompts, groups) 0/1 array and the number of n-grams per group; and the n-gram count of each prompt.
    """
    where = {}
    totals = np.zeros(len(token_lists_by_prompt))
    for i, token_lists in enumerate(token_lists_by_prompt):
        for tokens in token_lists:
            for g in ngrams(tokens, n):
                prompts = where.setdefault(g, [])
                if not prompts or prompts[-1] != i:
                    prompts.append(i)
                totals[i] += 1
    groups = Counter(tuple(p) for p in where.values())
    member = np.zeros((len(token_lists_by_prompt), len(groups)), dtype=np.float32)
    for column, prompts in enumerate(groups):
        member[list(prompts), column] = 1
    return member, np.array(list(groups.values()), dtype=np.float64), totals


def model_features(samples_by_prompt, scores=None):
    """
    Everything the statistics need from one model: samples_by_prompt[i] is the list of response texts to prompt i,
    scores {key: (prompts, samples) array} optional per-response scores (nan where a prompt has none).
    Per-response metrics become (numerator, denominator) per prompt, so a set's value is sum num / sum den.
    """
    parts = {key: ([], []) for key, *_ in METRICS if key not in CORPUS_KEYS and key not in SCORE_KEYS}
    tokens_by_prompt, vocab, blocks, word_counts = [], {}, [], []

    def add(key, num, den):
        parts[key][0].append(num)
        parts[key][1].append(den)

    for samples in samples_by_prompt:
        tokens = [word_tokens(s) for s in samples]
        stats = [response_stats(s) for s in samples]
        k, words = len(samples), sum(s["words"] for s in stats)
        em = sum(count_em_dashes(s) for s in samples)
        patterns = [pattern_counts(s) for s in samples]
        add("artifact_rate", sum(sum(count_artifacts(s).values()) > 0 for s in samples), k)
        add("em_dash", em, k)
        add("em_dash_1k", 1000 * em, words)
        add("en_dash", sum(count_en_dashes(s) for s in samples), k)
        for name in PATTERNS:
            add(name, sum(p[name] for p in patterns), k)
        add("repeated_3grams", sum(repeated_ngrams(t) for t in tokens),
            sum(max(len(t) - REPEAT_N + 1, 0) for t in tokens))
        for n in (1, 2, 3):
            value = distinct_n(tokens, n)
            add(f"self_distinct_{n}", *((0.0, 0) if math.isnan(value) else (value, 1)))
        add("words", words, k)
        add("chars", sum(s["chars"] for s in stats), k)
        add("sentence_words", words, sum(s["sentences"] for s in stats))
        tokens_by_prompt.append(tokens)
        blocks.append([vocab.setdefault(t, len(vocab)) for ts in tokens for t in ts])
        word_counts.append(Counter(blocks[-1]))
    for key, values in (scores or {}).items():
        parts[key] = ([], [])
        for row in np.asarray(values, dtype=np.float64):
            known = row[np.isfinite(row)]  # a prompt without a score (not a world prompt) is left out
            add(key, *((known.mean(), 1) if len(known) else (0.0, 0)))
    counts = np.zeros((len(samples_by_prompt), len(vocab)))
    for i, c in enumerate(word_counts):
        counts[i, list(c)] = list(c.values())
    return {"ratio": {key: (np.array(num, dtype=np.float64), np.array(den, dtype=np.float64))
                      for key, (num, den) in parts.items()},
            "word_counts": counts, "blocks": [_id_array(ids, len(vocab)) for ids in blocks],
            "presence": {n: _presence(tokens_by_prompt, n) for n in (1, 2, 3)}}


def _weights(idx, n):
    """(B, n) multiplicity of each prompt in each resample row of idx (B, m)."""
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    return np.bincount(rows * n + idx.ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n).astype(np.float64)


def statistic(features, key, idx, chunk=200):
    """The metric `key` of one model on each row of idx (B, m), a multiset of prompt indices: (B,) values."""
    n = len(features["blocks"])
    out = np.empty(idx.shape[0])
    for start in range(0, idx.shape[0], chunk):
        rows = idx[start:start + chunk]
        w = _weights(rows, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            if key in features["ratio"]:
                num, den = features["ratio"][key]
                value = (w @ num) / (w @ den)
            elif key == "gini":
                value = _gini_rows(w @ features["word_counts"])
            elif key == "mattr":
                value = np.array([_mattr_ids(np.concatenate([features["blocks"][i] for i in row]), MATTR_WINDOW)
                                  for row in rows])
            else:
                member, group_sizes, totals = features["presence"][1 if key == "ttr" else int(key[-1])]
                present = ((w > 0).astype(np.float32) @ member) > 0
                value = (present @ group_sizes) / (w @ totals)
        out[start:start + chunk] = value
    return out


# -----------------------------------------------------------------------------
# all models, all prompt sets, all comparisons

def _interval(samples, point, direction, level):
    lo, hi = centered_ci(point, samples, level)
    return {"delta": float(point), "lo": lo, "hi": hi, "verdict": verdict((lo, hi), direction)}


def quantile_names(num_quantiles):
    names = [f"q{q + 1}" for q in range(num_quantiles)]
    return {name: name + (" (sparsest)" if q == 0 else " (densest)" if q == num_quantiles - 1 else "")
            for q, name in enumerate(names)}


def collect_metrics(responses, scores=None, quantile=None, num_quantiles=4, num_resamples=1000, seed=0, level=0.95,
                    headline="artifact_rate", reference=None, contrast=None):
    """
    responses {model: [[sample texts] per prompt]} for any model names (identifiers: they make comparison keys
    "a-b"), scores {model: {key: (prompts, samples) array}}, quantile (prompts,) ints 0 = sparsest, or None.
    Differences: every other model minus `reference` (a model name, or None) and the `contrast` pair (a, b) = a - b
    (or None). Returns a JSON-ready dict: metric definitions, values per prompt set and model, comparisons with CIs
    and verdicts, and the rare-versus-dense section, with its plain-language answer for the `headline` metric when
    there is a contrast.
    """
    models = list(responses)
    if not models or not all(isinstance(m, str) and m.isidentifier() for m in models):
        raise ValueError(f"model names must be identifiers (they make keys like 'a-b'), got {models}")
    named = ([reference] if reference is not None else []) + list(contrast or ())
    unknown = [m for m in named if m not in responses]
    if unknown:
        raise ValueError(f"reference/contrast name unknown models {unknown}; the models are {models}")
    if contrast is not None and (len(contrast) != 2 or contrast[0] == contrast[1]):
        raise ValueError(f"a contrast is two different models (a, b), got {contrast}")
    n = len(responses[models[0]])
    if any(len(responses[m]) != n for m in models):
        raise ValueError(f"every model needs responses to the same {n} prompts, got "
                         f"{ {m: len(responses[m]) for m in models} }")
    features = {m: model_features(responses[m], (scores or {}).get(m)) for m in models}
    score_keys = set.intersection(*(set((scores or {}).get(m, {})) for m in models))
    metrics = [{"key": key, "label": label, "direction": d, "group": group}
               for key, label, d, group in METRICS if key not in SCORE_KEYS or key in score_keys]
    if not any(m["key"] == headline and m["direction"] for m in metrics):
        raise ValueError(f"headline metric {headline!r} is not a measured metric with a direction")
    subsets = {"all": np.arange(n)}
    labels = {"all": "all prompts"}
    if quantile is not None:
        for q, (name, label) in enumerate(quantile_names(num_quantiles).items()):
            members = np.flatnonzero(np.asarray(quantile) == q)
            if len(members):
                subsets[name], labels[name] = members, label
    comparisons = [(m, reference) for m in models if reference is not None and m != reference]
    if contrast is not None and tuple(contrast) not in comparisons:
        comparisons.append(tuple(contrast))
    values, intervals, samples = {}, {}, {}
    for s, (name, members) in enumerate(subsets.items()):
        idx = members[resample_indices(len(members), num_resamples, [seed, s])]
        values[name], intervals[name], samples[name] = {}, {}, {}
        for metric in metrics:
            key = metric["key"]
            point = {m: float(statistic(features[m], key, members[None, :])[0]) for m in models}
            samples[name][key] = {m: statistic(features[m], key, idx) for m in models}
            values[name][key] = point
            intervals[name][key] = {f"{a}-{b}": _interval(samples[name][key][a] - samples[name][key][b],
                                                          point[a] - point[b], metric["direction"], level)
                                    for a, b in comparisons}
    quantiles = [name for name in subsets if name != "all"]
    rare_vs_dense = None
    if len(quantiles) >= 2 and comparisons:
        rare, dense = quantiles[0], quantiles[-1]
        rows = {}
        for metric in metrics:
            key, d, row = metric["key"], metric["direction"], {}
            for a, b in comparisons:
                diff = {where: samples[where][key][a] - samples[where][key][b] for where in (rare, dense)}
                point = {where: values[where][key][a] - values[where][key][b] for where in (rare, dense)}
                row[f"{a}-{b}@rare"] = intervals[rare][key][f"{a}-{b}"]
                row[f"{a}-{b}@dense"] = intervals[dense][key][f"{a}-{b}"]
                row[f"{a}-{b}@gap"] = _interval(diff[rare] - diff[dense], point[rare] - point[dense], d, level)
            rows[key] = row
        rare_vs_dense = {"rare": rare, "dense": dense, "n_rare": len(subsets[rare]), "n_dense": len(subsets[dense]),
                         "pairs": [f"{a}-{b}" for a, b in comparisons], "rows": rows, "answer": None}
        if contrast is not None:
            rare_vs_dense["answer"] = rare_vs_dense_answer(
                rare_vs_dense, next(m for m in metrics if m["key"] == headline), reference, contrast, level)
    return {"models": models, "reference": reference, "contrast": None if contrast is None else list(contrast),
            "n_prompts": n, "samples_per_prompt": len(responses[models[0]][0]) if n else 0,
            "metrics": metrics, "subsets": {name: {"label": labels[name], "n": len(members)}
                                            for name, members in subsets.items()},
            "values": values, "comparisons": intervals, "rare_vs_dense": rare_vs_dense,
            "num_resamples": num_resamples, "level": level, "seed": seed, "headline": headline}


# -----------------------------------------------------------------------------
# rendering

def model_label(model):
    return LABELS.get(model, model)


def _pair_label(pair):
    """A comparison key as a column title: density-sft -> density-aware − SFT."""
    return " − ".join(model_label(m) for m in pair.split("-"))


def _num(x, digits=4):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _signed(x):
    return "n/a" if not math.isfinite(x) else ("+" if x > 0 else "−" if x < 0 else "") + _num(abs(x), 3)


def format_interval(iv, with_verdict=True):
    text = f"{_signed(iv['delta'])} [{_signed(iv['lo'])}, {_signed(iv['hi'])}]"
    return f"{text} {iv['verdict']}" if with_verdict else text


def _significance(iv):
    return "significant" if iv["lo"] > 0 or iv["hi"] < 0 else "not significant"


def rare_vs_dense_answer(rv, metric, reference, contrast, level=0.95):
    """
    The plain-language answer: did the contrast's first model (a) change the sparsest prompts more than its second
    (b)? With a reference other than a and b, how each moved from it there comes first.
    """
    rows, name, d = rv["rows"][metric["key"]], metric["label"], metric["direction"]
    a, b = contrast
    first, second = model_label(a), model_label(b)
    better = "higher" if d > 0 else "lower"
    rare_q = f"the sparsest density quantile ({rv['rare']}, {rv['n_rare']} prompts)"
    parts = []
    if reference in (None, a, b):
        parts.append(f"On {rare_q} the {name} is compared between the {first} and {second} models directly "
                     f"({better} is better).")
    else:
        parts.append(f"On {rare_q}, the {first} model changed the {name} by "
                     f"{format_interval(rows[f'{a}-{reference}@rare'], False)} relative to {model_label(reference)}, "
                     f"the {second} model by {format_interval(rows[f'{b}-{reference}@rare'], False)} ({level:.0%} "
                     f"CIs; {better} is better).")
    gap = rows[f"{a}-{b}@rare"]
    outcome = {"✅": f"the {first} model did significantly better than the {second} model on rare prompts",
               "❌": f"the {first} model did significantly worse than the {second} model on rare prompts"}.get(
        gap["verdict"], f"the {first} and {second} models did not differ significantly on rare prompts")
    parts.append(f"The difference {_pair_label(f'{a}-{b}')} there is {format_interval(gap, False)}: {outcome}.")
    dense, gap_gap = rows[f"{a}-{b}@dense"], rows[f"{a}-{b}@gap"]
    parts.append(f"On the densest quantile ({rv['dense']}, {rv['n_dense']} prompts) the difference is "
                 f"{format_interval(dense, False)}; the rare-minus-dense gap of that difference is "
                 f"{format_interval(gap_gap, False)} ({_significance(gap_gap)}).")
    return " ".join(parts)


def _escape(text, limit=None):
    text = text.replace("\n", " ⏎ ").replace("|", "\\|")
    return text if limit is None or len(text) <= limit else text[:limit] + " …"


def metric_table(results, subset):
    """Markdown table of every metric on one prompt set: values per model and each comparison with CI and verdict."""
    models, comparisons = results["models"], list(results["comparisons"][subset][results["metrics"][0]["key"]])
    head = ["group", "metric", "better"] + [model_label(m) for m in models] + [_pair_label(c) for c in comparisons]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    group = None
    for metric in results["metrics"]:
        key = metric["key"]
        cells = ["**" + metric["group"] + "**" if metric["group"] != group else "", metric["label"],
                 DIRECTION_SIGNS[metric["direction"]]]
        cells += [_num(results["values"][subset][key][m]) for m in models]
        cells += [format_interval(results["comparisons"][subset][key][c]) for c in comparisons]
        lines.append("| " + " | ".join(cells) + " |")
        group = metric["group"]
    return "\n".join(lines)


def rare_vs_dense_table(results):
    rv = results["rare_vs_dense"]
    columns = [(f"{p}@{where}", f"{_pair_label(p)}, {what}")
               for p in rv["pairs"] for where, what in (("rare", rv["rare"]), ("dense", rv["dense"]),
                                                        ("gap", f"{rv['rare']} − {rv['dense']}"))]
    lines = ["| metric | better | " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for metric in results["metrics"]:
        if metric["direction"] == 0:
            continue
        row = rv["rows"][metric["key"]]
        lines.append(f"| {metric['label']} | {DIRECTION_SIGNS[metric['direction']]} | "
                     + " | ".join(format_interval(row[c]) for c, _ in columns) + " |")
    return "\n".join(lines)


def render_report(results, header="", examples=(), notes=()):
    """
    The markdown report: `header` (what was run), notes, the summary table, the rare-versus-dense section, one
    table per density quantile and `examples` [{"prompt", "subset", "responses": {model: text}}].
    """
    level = f"{results['level']:.0%}"
    parts = ["# Diversity and mode-collapse report\n", header.strip() + "\n" if header else ""]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    parts.append(
        f"{results['n_prompts']} held-out prompts x {results['samples_per_prompt']} samples per model. Each "
        f"difference is (first − second) with a paired half-sample bootstrap {level} CI over prompts "
        f"({results['num_resamples']} resamples, seed {results['seed']}); ✅ the CI excludes 0 on the better side "
        f"(↑ higher is better, ↓ lower is better), ❌ on the worse side, ≈ the CI includes 0, — descriptive. "
        f"Formulas: nanochat/diversity.py.\n")
    parts += ["## Summary (all prompts)\n", metric_table(results, "all") + "\n"]
    rv, contrast = results["rare_vs_dense"], results["contrast"]
    if contrast is None:
        parts.append("## Rare vs dense prompts\n")
    else:
        parts.append(f"## Rare vs dense prompts: did the {model_label(contrast[0])} model change the sparsest prompts "
                     f"more than the {model_label(contrast[1])} model?\n")
    if rv is None:
        parts.append("Not measured: it needs at least two non-empty density quantiles and a reference or a contrast "
                     "(see the notes).\n")
    else:
        if rv["answer"] is None:
            parts.append("No contrast, so no answer; the differences from the reference:\n")
        else:
            headline = next(m for m in results["metrics"] if m["key"] == results["headline"])
            parts.append(f"**Answer ({headline['label']}):** {rv['answer']}\n")
        parts += [f"All metrics, {rv['rare']} = sparsest ({rv['n_rare']} prompts), {rv['dense']} = densest "
                  f"({rv['n_dense']} prompts); each cell a difference with its {level} CI and verdict, the gap "
                  f"column the sparsest-minus-densest difference of differences:\n",
                  rare_vs_dense_table(results) + "\n"]
    quantiles = [name for name in results["subsets"] if name != "all"]
    if quantiles:
        parts.append("## By density quantile of the prompt\n")
        for name in quantiles:
            parts += [f"### {results['subsets'][name]['label']}: {results['subsets'][name]['n']} prompts\n",
                      metric_table(results, name) + "\n"]
    if examples:
        parts.append("## Sample responses (first sample of each model)\n")
        for ex in examples:
            parts.append(f"**{ex['subset']}** — prompt: {_escape(ex['prompt'], 300)}\n")
            parts.append("\n".join(f"- {model_label(m)}: {_escape(text, 300) or '(empty)'}"
                                   for m, text in ex["responses"].items()) + "\n")
    return "\n".join(parts)


def write_charts(results, prefix):
    """PNG bar charts `<prefix>_summary.png` (every metric with a direction) and, when there are density quantiles,
    `<prefix>_quantiles.png` (the headline metric per quantile), each written atomically; their paths."""
    models, metrics = results["models"], [m for m in results["metrics"] if m["direction"] != 0]
    cols = 4
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        ax.bar([model_label(m) for m in models], [results["values"]["all"][metric["key"]][m] for m in models],
               color=[f"C{i}" for i in range(len(models))])
        ax.set_title(f"{metric['label']} {DIRECTION_SIGNS[metric['direction']]}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    paths = [save_png(fig, f"{prefix}_summary.png")]
    quantiles = [name for name in results["subsets"] if name != "all"]
    if quantiles:
        key = results["headline"]
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.subplots()
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            ax.bar(np.arange(len(quantiles)) + i * width, [results["values"][q][key][m] for q in quantiles], width,
                   label=model_label(m))
        ax.set_xticks(np.arange(len(quantiles)) + width * (len(models) - 1) / 2,
                      [results["subsets"][q]["label"] for q in quantiles])
        ax.set_title(next(m["label"] for m in results["metrics"] if m["key"] == key) + " by density quantile")
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the axes: inside, it covers bars near 1
        fig.tight_layout()
        paths.append(save_png(fig, f"{prefix}_quantiles.png"))
    return paths
