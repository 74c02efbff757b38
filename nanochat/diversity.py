"""
Mode-collapse metrics over sampled responses, with paired (half-sample) bootstrap confidence intervals over prompts,
Student-t intervals across training seeds and a verdict per comparison. scripts/kat_eval_diversity.py samples the
models and writes the report; everything here is a pure function of texts (and of per-response scores passed in), so
it works for any text, not only the synthetic world.

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

Models (arms) are any set of names (identifiers, e.g. sft, dpo_density, star_iter2), each one or more training runs
keyed by seed, all answering the same prompts with the same sampling seed. A model's value is the mean of its runs'
values. The differences taken: every other model minus the `reference` model (when one is named: how each moved
from it), and the `contrast` pair a - b (when one is named: e.g. density-aware minus uniform sampling).

Two sources of variance, both reported for every difference:
- evaluation: the half-sample bootstrap above applied to the model-mean statistic, every run of every model measured
  on the same half-samples (so it stays paired over prompts). It says how much another draw of prompts would move
  the difference of these checkpoints; not what another training seed would do. Its standard error se_eval is the
  spread of the half-sample differences, its minimum detectable effect (80% power, two-sided 5%)
  (z_0.975 + z_0.80) se_eval = (1.960 + 0.842) se_eval.
- across seeds (`seed_interval`): runs paired by seed value when both arms have the same seeds, the per-seed
  effects d_s = a_s - b_s, their mean and the Student-t CI mean +- t_(n-1, 0.975) sd(d) / sqrt(n); with different
  seeds, unpaired: Welch, se = sqrt(var_a / n_a + var_b / n_b), df by Welch-Satterthwaite; when one arm is a single
  run (the SFT reference every run starts from) each run of the other is set against it and the t has n - 1 df (the
  single run's own seed variance is not measured); with one run each, no interval ("n/a (1 seed)"). A
  rare-versus-dense gap uses each run's own gap. Minimum detectable effect (t_(df, 0.975) + t_(df, 0.80)) se. The
  t quantile inverts the t CDF, 1 - I_x(df/2, 1/2) / 2 at x = df / (df + t^2), by Newton's method; I_x is the
  regularized incomplete beta function by its continued fraction.

Degenerate intervals are flagged (⚠), not shown as a precise estimate (or, at 0, a precise null): a zero-width
evaluation CI or CI across seeds, or the two arms' responses byte-identical on most (> 50%) samples of the set (the
share is reported per pair of runs and overall; runs are compared by seed when paired, else every pair). A
zero-width CI across seeds (every seed gave the same effect, as a few discrete counts easily do) gets no verdict
either: its verdict is ⚠, undecided, wherever it appears, the primary outcome included.

The pre-registered primary outcome: the `primary` metric of the contrast a - b on the sparsest quantile, inferred
across seeds (with one run per arm: over evaluation noise only, and said so), with the within-prompt distinct-n of
the same contrast beside it. Everything else is exploratory, and the report counts its verdicts: about 5% of true
nulls come out ✅ or ❌ by chance.

Verdict of a difference (first - second), for either CI: ✅ when the CI excludes 0 on the metric's good side, ❌ when
it excludes 0 on the bad side, ≈ when it includes 0, — for descriptive metrics, n/a when undefined.
"""

import functools
import math
import re
from collections import Counter
from statistics import NormalDist

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
SELF_DISTINCT_KEYS = ("self_distinct_1", "self_distinct_2", "self_distinct_3")  # beside the primary outcome
POWER = 0.80  # of the minimum detectable effect
ZERO_WIDTH = 1e-12  # a CI narrower than this (relative to max(1, |estimate|)) has zero width: flagged degenerate
MOSTLY_IDENTICAL = 0.5  # a larger share of byte-identical responses between two arms flags their difference


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


def zero_width(width, estimate):
    """A spread (CI width or standard error) too small to be measured: ZERO_WIDTH relative to max(1, |estimate|)."""
    return width <= ZERO_WIDTH * max(1.0, abs(estimate))


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
# Student's t and intervals across training seeds

def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz's method)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    # the fraction converges fast below the mean of Beta(a, b); above it I_x(a, b) = 1 - I_(1-x)(b, a) is below
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 100_000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for term in (even, odd):
            d = 1 + term * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + term / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * fraction / a


def t_cdf(t, df):
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df need not be an integer: Welch's is not)."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_pdf(t, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom; df = inf gives the standard normal's."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    # Newton from 0: the CDF is concave on t >= 0, so every step lands short of the root and the steps shrink to it
    t = 0.0
    for _ in range(200):
        step = (t_cdf(t, df) - p) / t_pdf(t, df)
        t -= step
        if abs(step) <= 1e-12 * (1 + t):
            break
    return t


def pairing(seeds_a, seeds_b):
    """
    How the runs (training seeds) of arm a are compared with those of arm b: "paired" by seed value when both have
    the same seeds (>= 2), "welch" (unpaired) when they have different seeds and >= 2 runs each, "fixed_b" /
    "fixed_a" when that arm is a single run (a fixed point, e.g. the SFT model every run starts from: its own seed
    variance is not measured), "single" with one run each (no interval across seeds).
    """
    if len(seeds_a) == 1 and len(seeds_b) == 1:
        return "single"
    if set(seeds_a) == set(seeds_b):
        return "paired"
    return "fixed_b" if len(seeds_b) == 1 else "fixed_a" if len(seeds_a) == 1 else "welch"


def run_pairs(seeds_a, seeds_b):
    """The (seed of a, seed of b) runs whose responses are set side by side: the same seed when paired, else all."""
    if pairing(seeds_a, seeds_b) == "paired":
        return [(s, s) for s in seeds_a]
    return [(sa, sb) for sa in seeds_a for sb in seeds_b]


def seed_interval(a_runs, b_runs, direction, level=0.95):
    """
    Across-seed inference on arm a minus arm b from each run's value, {seed: value} per arm (see `pairing`): the
    per-seed effects (a - b per seed when paired; each run against the single run of the other arm; None for
    welch), their mean, its standard error and degrees of freedom (paired or against one run: the effects' sd /
    sqrt(n), n - 1; welch: sqrt(var_a / n_a + var_b / n_b) with the Welch-Satterthwaite df), the Student-t CI
    mean +- t_(df, 1 - alpha/2) se, its verdict, and the minimum detectable effect (t_(df, 1 - alpha/2) +
    t_(df, POWER)) se; and each arm's runs. With one run each: nan CI, verdict "n/a".
    """
    mode = pairing(list(a_runs), list(b_runs))
    a, b = np.array(list(a_runs.values()), dtype=np.float64), np.array(list(b_runs.values()), dtype=np.float64)
    if mode == "paired":
        effects = {s: float(a_runs[s] - b_runs[s]) for s in a_runs}
    elif mode in ("fixed_b", "single"):
        effects = {s: float(v - b[0]) for s, v in a_runs.items()}
    elif mode == "fixed_a":
        effects = {s: float(a[0] - v) for s, v in b_runs.items()}
    else:
        effects = None
    out = {"pairing": mode, "n_a": len(a), "n_b": len(b), "runs_a": {s: float(v) for s, v in a_runs.items()},
           "runs_b": {s: float(v) for s, v in b_runs.items()}, "effects": effects, "mean": float(a.mean() - b.mean()),
           "se": math.nan, "df": math.nan, "lo": math.nan, "hi": math.nan, "verdict": "n/a", "mde": math.nan}
    if mode == "single":
        return out
    if effects is not None:
        d = np.array(list(effects.values()))
        se, df = d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        # both variances 0: a zero-width interval, flagged; any df gives it
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    t = t_quantile(1 - (1 - level) / 2, df)
    lo, hi = out["mean"] - t * se, out["mean"] + t * se
    # every seed gave the same effect: the zero width comes from a handful of discrete counts, not from a measured
    # precision, so the interval gives no verdict (⚠) even when it excludes 0
    undecided = direction != 0 and zero_width(se, out["mean"])
    out.update(se=float(se), df=float(df), lo=float(lo), hi=float(hi),
               verdict="⚠" if undecided else verdict((lo, hi), direction), mde=float((t + t_quantile(POWER, df)) * se))
    return out


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
# all models (arms) and their runs, all prompt sets, all comparisons

def _identical_by_prompt(responses_a, responses_b):
    """Per prompt, the share of samples whose texts are byte-identical in two runs (same prompts, same sample order)."""
    return np.array([np.mean([x == y for x, y in zip(a, b)]) for a, b in zip(responses_a, responses_b)])


def _identical_shares(by_run_pair, members):
    """{"share": mean over the run pairs, "runs": {"seed_a/seed_b": share}} of byte-identical samples on members."""
    runs = {f"{sa}/{sb}": float(same[members].mean()) for (sa, sb), same in by_run_pair.items()}
    return {"share": float(np.mean(list(runs.values()))), "runs": runs}


def _difference(point, samples, a_runs, b_runs, direction, level, identical):
    """
    One difference a - b of arm means: `point` on all prompts of the set, `samples` (B,) on its half-samples. The
    evaluation CI and verdict, its standard error (the half-sample spread: a half-sample mean spreads like the full
    mean) and minimum detectable effect (z_(1 - alpha/2) + z_POWER) se; the inference across seeds from the runs'
    values (seed_interval); the share of byte-identical responses; the reasons the interval is degenerate (or []).
    """
    lo, hi = centered_ci(point, samples, level)
    finite = samples[np.isfinite(samples)]
    se = float(finite.std()) if len(finite) else math.nan
    seeds = seed_interval(a_runs, b_runs, direction, level)
    degenerate = []
    # a zero width says the data cannot show any spread (e.g. identical responses), not that the difference is exact
    if zero_width(hi - lo, point):
        degenerate.append("zero-width evaluation CI")
    if zero_width(seeds["se"], seeds["mean"]):
        degenerate.append("zero-width CI across seeds")
    if identical > MOSTLY_IDENTICAL:
        degenerate.append(f"byte-identical responses on {identical:.0%} of samples")
    z = t_quantile(1 - (1 - level) / 2, math.inf) + t_quantile(POWER, math.inf)
    return {"delta": float(point), "lo": lo, "hi": hi, "verdict": verdict((lo, hi), direction), "se": se,
            "mde": z * se, "seeds": seeds, "identical": float(identical), "degenerate": degenerate}


def quantile_names(num_quantiles):
    names = [f"q{q + 1}" for q in range(num_quantiles)]
    return {name: name + (" (sparsest)" if q == 0 else " (densest)" if q == num_quantiles - 1 else "")
            for q, name in enumerate(names)}


def collect_metrics(responses, scores=None, quantile=None, num_quantiles=4, num_resamples=1000, seed=0, level=0.95,
                    primary="artifact_rate", reference=None, contrast=None, quantile_basis=None):
    """
    responses {model: {seed: [[sample texts] per prompt]}}: each model (an arm) is one or more training runs keyed by
    their seed, every run answering the same prompts; model names are identifiers (they make comparison keys "a-b").
    scores {model: {seed: {key: (prompts, samples) array}}}, quantile (prompts,) ints 0 = sparsest, or None, and
    quantile_basis what the quantiles are quantiles of ("training": the training prompts' densities; "evaluated":
    the evaluated prompts' own), which the report states.
    A model's value is the mean of its runs' values. Differences: every other model minus `reference` (a model name,
    or None) and the `contrast` pair (a, b) = a - b (or None), each with an evaluation CI (the same half-samples for
    every run of every model, so it stays paired) and inference across seeds (seed_interval).
    Returns a JSON-ready dict: metric definitions, values per prompt set and model (and per run), comparisons,
    shares of byte-identical responses, the rare-versus-dense section and the pre-registered primary outcome: the
    `primary` metric's contrast on the sparsest quantile, inferred across seeds, beside the within-prompt distinct-n.
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
    runs = {m: list(responses[m]) for m in models}
    if not all(runs.values()):
        raise ValueError(f"every model needs at least one run, got seeds {runs}")
    n = len(responses[models[0]][runs[models[0]][0]])
    sizes = {m: [len(r) for r in responses[m].values()] for m in models}
    if any(size != n for per_run in sizes.values() for size in per_run):
        raise ValueError(f"every run of every model needs responses to the same {n} prompts, got {sizes}")
    scores = scores or {}
    features = {m: {r: model_features(responses[m][r], scores.get(m, {}).get(r)) for r in runs[m]} for m in models}
    score_keys = set.intersection(*(set(scores.get(m, {}).get(r) or {}) for m in models for r in runs[m]))
    metrics = [{"key": key, "label": label, "direction": d, "group": group}
               for key, label, d, group in METRICS if key not in SCORE_KEYS or key in score_keys]
    if not any(m["key"] == primary and m["direction"] for m in metrics):
        raise ValueError(f"primary metric {primary!r} is not a measured metric with a direction")
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
    same = {f"{a}-{b}": {(sa, sb): _identical_by_prompt(responses[a][sa], responses[b][sb])
                         for sa, sb in run_pairs(runs[a], runs[b])} for a, b in comparisons}
    values, run_values, intervals, identical, arm_samples = {}, {}, {}, {}, {}
    for s, (name, members) in enumerate(subsets.items()):
        idx = members[resample_indices(len(members), num_resamples, [seed, s])]
        identical[name] = {pair: _identical_shares(by_run_pair, members) for pair, by_run_pair in same.items()}
        values[name], run_values[name], intervals[name], arm_samples[name] = {}, {}, {}, {}
        for metric in metrics:
            key = metric["key"]
            points = {m: {r: float(statistic(features[m][r], key, members[None, :])[0]) for r in runs[m]}
                      for m in models}
            # an arm's statistic on a half-sample is the mean of its runs' on that same half-sample
            samples = {m: np.mean([statistic(features[m][r], key, idx) for r in runs[m]], axis=0) for m in models}
            value = {m: float(np.mean(list(points[m].values()))) for m in models}
            values[name][key], run_values[name][key], arm_samples[name][key] = value, points, samples
            intervals[name][key] = {
                f"{a}-{b}": _difference(value[a] - value[b], samples[a] - samples[b], points[a], points[b],
                                        metric["direction"], level, identical[name][f"{a}-{b}"]["share"])
                for a, b in comparisons}
    quantiles = [name for name in subsets if name != "all"]
    rare_vs_dense = None
    if len(quantiles) >= 2 and comparisons:
        rare, dense = quantiles[0], quantiles[-1]
        both = np.concatenate([subsets[rare], subsets[dense]])
        rows = {}
        for metric in metrics:
            key, row = metric["key"], {}
            for a, b in comparisons:
                pair = f"{a}-{b}"
                row[f"{pair}@rare"], row[f"{pair}@dense"] = intervals[rare][key][pair], intervals[dense][key][pair]
                # the two quantiles hold different prompts, so their half-samples are independent of each other
                diff = {where: arm_samples[where][key][a] - arm_samples[where][key][b] for where in (rare, dense)}
                gap = {m: {r: run_values[rare][key][m][r] - run_values[dense][key][m][r] for r in runs[m]}
                       for m in (a, b)}
                row[f"{pair}@gap"] = _difference(row[f"{pair}@rare"]["delta"] - row[f"{pair}@dense"]["delta"],
                                                 diff[rare] - diff[dense], gap[a], gap[b], metric["direction"],
                                                 level, _identical_shares(same[pair], both)["share"])
            rows[key] = row
        rare_vs_dense = {"rare": rare, "dense": dense, "n_rare": len(subsets[rare]), "n_dense": len(subsets[dense]),
                         "pairs": [f"{a}-{b}" for a, b in comparisons], "rows": rows, "answer": None}
        if contrast is not None:
            rare_vs_dense["answer"] = rare_vs_dense_answer(
                rare_vs_dense, next(m for m in metrics if m["key"] == primary), reference, contrast, level)
    sparsest = next(iter(quantile_names(num_quantiles)))
    metric = next(m for m in metrics if m["key"] == primary)
    outcome = {"metric": primary, "label": metric["label"], "direction": metric["direction"], "subset": sparsest,
               "contrast": None if contrast is None else list(contrast), "quantile_basis": quantile_basis,
               "n_prompts": len(subsets.get(sparsest, ())), "measured": False, "inference": None, "verdict": "n/a",
               "interval": None, "identical": None, "self_distinct": None}
    if contrast is None:
        outcome["answer"] = "Not measured: no contrast (a pair of models to compare) was named."
    elif sparsest not in subsets:
        outcome["answer"] = ("Not measured: " + ("the prompts have no density quantiles." if quantile is None else
                                                 f"no evaluated prompt is in {sparsest}."))
    else:
        pair = f"{contrast[0]}-{contrast[1]}"
        iv = intervals[sparsest][primary][pair]
        across = iv["seeds"]["pairing"] != "single"
        outcome.update(measured=True, inference="across seeds" if across else "evaluation noise only",
                       verdict=iv["seeds"]["verdict"] if across else iv["verdict"], interval=iv,
                       identical=identical[sparsest][pair],
                       self_distinct={key: {where: intervals[where][key][pair] for where in (sparsest, "all")}
                                      for key in SELF_DISTINCT_KEYS})
        outcome["answer"] = primary_answer(outcome, level)
    return {"models": models, "runs": runs, "reference": reference,
            "contrast": None if contrast is None else list(contrast), "n_prompts": n,
            "samples_per_prompt": len(responses[models[0]][runs[models[0]][0]][0]) if n else 0,
            "metrics": metrics, "subsets": {name: {"label": labels[name], "n": len(members)}
                                            for name, members in subsets.items()},
            "values": values, "run_values": run_values, "comparisons": intervals, "identical": identical,
            "rare_vs_dense": rare_vs_dense, "primary": outcome, "primary_metric": primary,
            "quantile_basis": quantile_basis, "num_resamples": num_resamples, "level": level, "seed": seed}


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


def _ci(lo, hi):
    return f"[{_signed(lo)}, {_signed(hi)}]"


def format_interval(iv, with_verdict=True):
    """
    A difference as a table cell: 'delta [evaluation CI] verdict', then '; seeds [CI across seeds] verdict' when
    there is one (not with one run each), then ⚠ when the interval is degenerate.
    """
    text = f"{_signed(iv['delta'])} {_ci(iv['lo'], iv['hi'])}" + (f" {iv['verdict']}" if with_verdict else "")
    seeds = iv["seeds"]
    if seeds["pairing"] != "single":
        text += f"; seeds {_ci(seeds['lo'], seeds['hi'])}" + (f" {seeds['verdict']}" if with_verdict else "")
    return text + (" ⚠" if iv["degenerate"] and not text.endswith("⚠") else "")  # one mark when the verdict is ⚠


def _significance(iv):
    return "significant" if iv["lo"] > 0 or iv["hi"] < 0 else "not significant"


def pairing_words(seeds, a, b):
    """How the runs of a and b were set against each other, in words."""
    first, second = model_label(a), model_label(b)
    return {"paired": f"paired by seed, {seeds['n_a']} seeds",
            "welch": f"unpaired, the arms' seeds differ: Welch's t over {seeds['n_a']} and {seeds['n_b']} runs",
            "fixed_b": f"each of the {seeds['n_a']} {first} runs against the one {second} run, whose own seed "
                       f"variance is not measured",
            "fixed_a": f"the one {first} run against each of the {seeds['n_b']} {second} runs, its own seed variance "
                       f"not measured",
            "single": "one run each"}[seeds["pairing"]]


def _effects_text(seeds, a, b):
    """The per-seed effects, or (unpaired) each arm's runs."""
    if seeds["effects"] is not None:
        return ", ".join(f"seed {s}: {_signed(v)}" for s, v in seeds["effects"].items())
    return "; ".join(f"{model_label(m)} runs " + ", ".join(f"seed {s}: {_num(v)}" for s, v in runs.items())
                     for m, runs in ((a, seeds["runs_a"]), (b, seeds["runs_b"])))


def primary_answer(outcome, level=0.95):
    """
    The primary outcome in words: the verdict and what it rests on (seeds, or evaluation noise alone with one run
    per arm), the per-seed effects, both CIs, the smallest detectable effects and any degenerate flag.
    """
    iv, seeds = outcome["interval"], outcome["interval"]["seeds"]
    a, b = outcome["contrast"]
    first, second, label = model_label(a), model_label(b), outcome["label"]
    better, worse = ("higher", "lower") if outcome["direction"] > 0 else ("lower", "higher")
    where = f"{outcome['subset']} ({outcome['n_prompts']} prompts)"
    across = outcome["inference"] == "across seeds"
    basis = f"across training seeds, {pairing_words(seeds, a, b)}" if across else "over evaluation noise only"
    finding = {"✅": f"the {first} runs had a significantly {better} {label} than the {second} runs on {where} "
                    f"({basis}): {first} did better on rare prompts",
               "❌": f"the {first} runs had a significantly {worse} {label} than the {second} runs on {where} "
                    f"({basis}): {first} did worse on rare prompts",
               "≈": f"no significant difference between the {first} and {second} runs on {where} ({basis})",
               "⚠": f"undecided on {where}: every seed gave the same effect, so the interval {basis} has zero "
                    f"width, which with {len(seeds['runs_a'])} seeds is no measure of precision; more seeds "
                    f"decide"}.get(
        outcome["verdict"], f"undefined: the {label} has no value on {where}")
    tail = f"two-sided {1 - level:.0%}"
    parts = [f"**Answer:** {first} − {second} = {_signed(iv['delta'])}: {finding}."]
    if across:
        parts.append(f"Per-seed effects: {_effects_text(seeds, a, b)}; mean {_signed(seeds['mean'])}, {level:.0%} CI "
                     f"across seeds {_ci(seeds['lo'], seeds['hi'])} (Student t, {_num(seeds['df'], 3)} df).")
    else:
        parts.append(f"{level:.0%} CI across seeds: n/a (1 seed). With one training run per arm this verdict covers "
                     f"evaluation noise only (these two checkpoints on these prompts), not the variation between "
                     f"training seeds, so it cannot tell the sampling method from the luck of one seed.")
    parts.append(f"Evaluation CI (which prompts were drawn, for these checkpoints; paired half-sample bootstrap): "
                 f"{_ci(iv['lo'], iv['hi'])} {iv['verdict']}.")
    parts.append(f"The smallest effect these runs could have detected ({POWER:.0%} power, {tail}): "
                 + (f"±{_num(seeds['mde'], 3)} across seeds, " if across else "")
                 + f"±{_num(iv['mde'], 3)} over evaluation noise.")
    runs = outcome["identical"]["runs"]
    parts.append(f"Byte-identical responses between the arms on {outcome['subset']}: {iv['identical']:.0%}"
                 + (f" (runs {', '.join(f'{pair}: {share:.0%}' for pair, share in runs.items())})"
                    if len(runs) > 1 else "") + ".")
    if iv["degenerate"]:
        parts.append(f"⚠ Degenerate: {'; '.join(iv['degenerate'])}. Such an interval measures no precision: it is "
                     f"not a precise estimate (nor, at 0, a precise null).")
    else:
        parts.append("No degenerate interval.")
    return " ".join(parts)


def rare_vs_dense_answer(rv, metric, reference, contrast, level=0.95):
    """
    The exploratory reading of the rare-versus-dense gap of the contrast a - b on one metric: a - b on the sparsest
    and on the densest quantile and their gap, each with its evaluation CI (and its CI across seeds when there is
    one); with a reference other than a and b, how each moved from it on the sparsest quantile.
    """
    rows, name, d = rv["rows"][metric["key"]], metric["label"], metric["direction"]
    a, b = contrast
    pair = f"{a}-{b}"
    rare_q = f"the sparsest density quantile ({rv['rare']}, {rv['n_rare']} prompts)"
    text = f"On {rare_q}, {_pair_label(pair)} in the {name} ({'higher' if d > 0 else 'lower'} is better) is " \
           f"{format_interval(rows[f'{pair}@rare'], False)}"
    if reference not in (None, a, b):
        text += (f" (relative to {model_label(reference)}: {model_label(a)} "
                 f"{format_interval(rows[f'{a}-{reference}@rare'], False)}, {model_label(b)} "
                 f"{format_interval(rows[f'{b}-{reference}@rare'], False)})")
    gap = rows[f"{pair}@gap"]
    seeds = "" if gap["seeds"]["pairing"] == "single" else f", {_significance(gap['seeds'])} across seeds"
    return (f"{text}; on the densest ({rv['dense']}, {rv['n_dense']} prompts) it is "
            f"{format_interval(rows[f'{pair}@dense'], False)}; the rare-minus-dense gap is "
            f"{format_interval(gap, False)} ({_significance(gap)} over evaluation noise{seeds}; {level:.0%} CIs).")


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


def primary_section(results):
    """
    The pre-registered primary outcome: what decides the question, stated before any number of the run, then the
    answer in words and a table of it beside the within-prompt distinct-n of the same contrast (sparsest quantile
    and all prompts).
    """
    p, level = results["primary"], results["level"]
    first, second = (model_label(m) for m in p["contrast"]) if p["contrast"] else ("first", "second")
    better = "higher" if p["direction"] > 0 else "lower"
    parts = ["## Primary outcome (pre-registered)\n",
             f"The question: does sampling RLHF prompts inversely to their density reduce mode collapse, most of all "
             f"on rare prompts, compared with uniform prompt sampling? One number, fixed before the runs, decides "
             f"it: the {p['label']} ({better} is better) of the {first} model minus the {second} model on the "
             f"sparsest density quartile, {p['subset']}: held-out prompts whose kNN density against the training "
             f"prompts falls in the sparsest quarter of the training prompts' densities. It is inferred across "
             f"training seeds: the mean of the per-seed differences with its {level:.0%} Student-t confidence "
             f"interval (runs paired by seed when both arms have the same seeds). ✅ or ❌ there answers the "
             f"question; ≈ says no effect as large as the minimum detectable one was found; ⚠ (every seed gave the "
             f"same effect: a zero-width interval) decides nothing. Everything after this section is "
             f"exploratory.\n"]
    if p["quantile_basis"] == "evaluated":
        parts.append(f"⚠ **Here {p['subset']} is not rare in training.** No density file covered the evaluated "
                     f"prompts (see the notes), so the quartiles are of the evaluated prompts' densities among "
                     f"themselves: 'rare' means rare among the evaluated prompts, not in the training data.\n")
    parts.append(p["answer"] + "\n")
    if not p["measured"]:
        return "\n".join(parts)
    pair = "-".join(p["contrast"])
    n = {name: results["subsets"][name]["n"] for name in (p["subset"], "all")}
    head = ["metric", "prompts", _pair_label(pair), "per-seed effects", f"{level:.0%} CI across seeds",
            f"{level:.0%} evaluation CI", "smallest detectable (seeds; evaluation)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(f"**{p['label']} (primary)**", p["direction"], p["subset"], p["interval"])]
    rows += [(next(m["label"] for m in results["metrics"] if m["key"] == key), +1, where, ivs[where])
             for key, ivs in p["self_distinct"].items() for where in (p["subset"], "all")]
    for label, direction, where, iv in rows:
        seeds = iv["seeds"]
        across = seeds["pairing"] != "single"
        lines.append("| " + " | ".join([
            f"{label} {DIRECTION_SIGNS[direction]}", f"{where} ({n[where]})",
            _signed(iv["delta"]) + (" ⚠" if iv["degenerate"] else ""),
            _effects_text(seeds, *p["contrast"]) if across else "n/a (1 seed)",
            f"{_ci(seeds['lo'], seeds['hi'])} {seeds['verdict']}" if across else "n/a (1 seed)",
            f"{_ci(iv['lo'], iv['hi'])} {iv['verdict']}",
            f"{_num(seeds['mde'], 3) if across else 'n/a'}; {_num(iv['mde'], 3)}"]) + " |")
    parts.append("\n".join(lines) + "\n")
    flagged = [f"{label} on {where}: {'; '.join(iv['degenerate'])}" for label, _, where, iv in rows
               if iv["degenerate"]]
    if flagged:
        parts.append("⚠ degenerate (not a measured precision): " + " · ".join(flagged) + "\n")
    return "\n".join(parts)


def exploratory_verdicts(results):
    """(over evaluation noise, across seeds): the ✅/❌/≈ verdicts the exploratory tables hold, each counted once
    (the rare-vs-dense table's sparsest and densest columns repeat the quantile tables')."""
    intervals = [iv for subset in results["comparisons"].values() for row in subset.values() for iv in row.values()]
    rv = results["rare_vs_dense"]
    if rv is not None:
        intervals += [row[f"{pair}@gap"] for row in rv["rows"].values() for pair in rv["pairs"]]
    tests = ("✅", "❌", "≈")
    return (sum(iv["verdict"] in tests for iv in intervals),
            sum(iv["seeds"]["verdict"] in tests for iv in intervals))


def training_mix_table(mix):
    """
    The prompts each arm drew in training, from its runs' drawn_prompts.json: mix {arm: {"runs", "missing" (run
    directories without the file), "draws", "distinct_prompts" (means over the runs with it), "by_quartile",
    "by_cluster" ({name: mean share of draws})}}. A table of the arms with files and a line naming the missing.
    """
    arms = [arm for arm, m in mix.items() if len(m["missing"]) < m["runs"]]
    parts = []
    if arms:
        quartiles = sorted({q for arm in arms for q in mix[arm]["by_quartile"]})
        clusters = sorted({c for arm in arms for c in mix[arm]["by_cluster"]})
        head = (["arm", "runs with the file", "draws", "distinct prompts"]
                + [f"{q} share" for q in quartiles] + [f"cluster {c}" for c in clusters])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in arms:
            m = mix[arm]
            lines.append("| " + " | ".join(
                [model_label(arm), f"{m['runs'] - len(m['missing'])} of {m['runs']}", _num(m["draws"]),
                 _num(m["distinct_prompts"])] + [f"{m['by_quartile'].get(q, 0):.1%}" for q in quartiles]
                + [f"{m['by_cluster'].get(c, 0):.1%}" for c in clusters]) + " |")
        parts.append("Means over each arm's runs of their drawn_prompts.json: the share of training draws per "
                     "training-density quartile (q1 sparsest) and per cluster, and the distinct prompts drawn.\n")
        parts.append("\n".join(lines) + "\n")
    missing = [path for m in mix.values() for path in m["missing"]]
    if missing:
        parts.append(f"No drawn_prompts.json in {', '.join(missing)}: "
                     + ("those runs are left out of the means." if arms else "the arms' prompt mix is unknown.") + "\n")
    return "\n".join(parts)


def render_report(results, header="", examples=(), notes=(), training_mix=None):
    """
    The markdown report: the pre-registered primary outcome first (no number of the run comes before it), then
    `header` (what was run), notes, the prompts each arm drew in training (`training_mix`, see training_mix_table;
    None: no section), the exploratory part (a note on multiple comparisons, the summary table, the rare-versus-dense
    section, one table per density quantile) and `examples` [{"prompt", "subset", "responses": {model: text}}].
    """
    level = f"{results['level']:.0%}"
    parts = ["# Diversity and mode-collapse report\n", primary_section(results)]
    if header:
        parts += ["## Run\n", header.strip() + "\n"]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    if training_mix is not None:
        parts += ["## Prompts each arm drew in training\n", training_mix_table(training_mix)]
    by_eval, by_seeds = exploratory_verdicts(results)
    chance = 1 - results["level"]
    # how the runs are set against each other depends only on the two models' seeds: one metric's row says it
    pairings = results["comparisons"]["all"][results["metrics"][0]["key"]]
    parts += [
        "## Exploratory results\n",
        f"Everything below is exploratory. Its tables hold {by_eval + by_seeds} verdicts ({by_eval} over evaluation "
        f"noise, {by_seeds} across seeds). Each is a test at the {chance:.0%} level, so even if every one were a true "
        f"null about {chance:.0%} of them, ~{chance * (by_eval + by_seeds):.0f}, would come out ✅ or ❌ by chance: "
        f"read a ✅ or ❌ here as a lead for the next pre-registered test, not as a finding.\n",
        f"{results['n_prompts']} held-out prompts x {results['samples_per_prompt']} samples per run; a model's value "
        f"is the mean over its runs. A cell is a difference of model values (first − second), its {level} "
        f"evaluation CI (paired half-sample bootstrap over prompts, the same half-samples for every run: "
        f"{results['num_resamples']} resamples, seed {results['seed']}) and verdict, then, when a model has "
        f"several runs, 'seeds [..]': its {level} Student-t CI across training seeds and verdict. ✅ the CI "
        f"excludes 0 on the better side (↑ higher is better, ↓ lower is better), ❌ on the worse side, ≈ it "
        f"includes 0, — descriptive; ⚠ degenerate: a zero-width CI or byte-identical responses on most samples, "
        f"which measure no precision. Formulas: nanochat/diversity.py.\n"]
    if pairings and all(iv["seeds"]["pairing"] == "single" for iv in pairings.values()):
        parts.append("Every model here is one training run: every verdict covers evaluation noise only (these "
                     "checkpoints on these prompts), not the variation between training seeds.\n")
    elif pairings:
        parts.append("Across seeds: " + "; ".join(
            f"{_pair_label(pair)}: {pairing_words(iv['seeds'], *pair.split('-'))}"
            + (" (no CI across seeds: its verdicts cover evaluation noise only)"
               if iv["seeds"]["pairing"] == "single" else "") for pair, iv in pairings.items()) + ".\n")
    parts += ["## Exploratory: summary (all prompts)\n", metric_table(results, "all") + "\n"]
    rv, contrast = results["rare_vs_dense"], results["contrast"]
    if contrast is None:
        parts.append("## Exploratory: rare vs dense prompts\n")
    else:
        parts.append(f"## Exploratory: rare vs dense prompts, {model_label(contrast[0])} against "
                     f"{model_label(contrast[1])}\n")
    if rv is None:
        parts.append("Not measured: it needs at least two non-empty density quantiles and a reference or a contrast "
                     "(see the notes).\n")
    else:
        if rv["answer"] is not None:
            metric = next(m for m in results["metrics"] if m["key"] == results["primary_metric"])
            parts.append(f"**{metric['label']}:** {rv['answer']}\n")
        parts += [f"All metrics, {rv['rare']} = sparsest ({rv['n_rare']} prompts), {rv['dense']} = densest "
                  f"({rv['n_dense']} prompts); the gap columns are the sparsest-minus-densest difference of "
                  f"differences:\n", rare_vs_dense_table(results) + "\n"]
    quantiles = [name for name in results["subsets"] if name != "all"]
    if quantiles:
        parts.append("## Exploratory: by density quantile of the prompt\n")
        for name in quantiles:
            parts += [f"### {results['subsets'][name]['label']}: {results['subsets'][name]['n']} prompts\n",
                      metric_table(results, name) + "\n"]
    if examples:
        parts.append("## Sample responses (first sample of each model's first run)\n")
        for ex in examples:
            parts.append(f"**{ex['subset']}** — prompt: {_escape(ex['prompt'], 300)}\n")
            parts.append("\n".join(f"- {model_label(m)}: {_escape(text, 300) or '(empty)'}"
                                   for m, text in ex["responses"].items()) + "\n")
    return "\n".join(parts)


def write_charts(results, prefix):
    """PNG bar charts `<prefix>_summary.png` (every metric with a direction) and, when there are density quantiles,
    `<prefix>_quantiles.png` (the primary metric per quantile), each written atomically; their paths. A bar is a
    model's value, the mean over its runs."""
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
        key = results["primary_metric"]
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
