"""
AutoDeco evaluation: does sampling with the heads' per-token temperature (and top-p) beat every fixed temperature?

    python -m scripts.kat_eval_autodeco                                   # outs/autodeco -> outs/autodeco_eval/
    python -m scripts.kat_eval_autodeco --num_prompts=200 --num_samples=16 --temperatures=0.2,0.4,0.7,1,1.3,1.6
    python -m scripts.kat_eval_autodeco --autodeco_path=/tmp/run/outs/autodeco --out_dir=/tmp/run/outs/autodeco_eval

The experiment needs a base model that has seen answers mixing one-right-value tokens with free ones, and heads
trained on such answers; from the cpu speedrun's outs/mid:

    python -m scripts.chat_sft --free_clause_rate=0.5 --out_dir=outs/sft_free
    python -m scripts.kat_construct_autodeco --base_model_name_or_path outs/sft_free --output_dir outs/autodeco_init
    python -m scripts.kat_train_autodeco --model_name_or_path outs/autodeco_init --output_dir outs/autodeco
    python -m scripts.kat_eval_autodeco

The heads (scripts.kat_train_autodeco) sit on a frozen chat model; nanochat.autodeco.load_autodeco gives both. On
--num_prompts held-out questions of the model's synthetic world (World.eval_questions seeded by --seed: every topic
equally often, half of them phrased in templates no training data uses), each method answers --num_samples times:

- greedy: one answer, repeated (what any temperature -> 0 gives);
- fixed temperatures (--temperatures), each with min-p at the heads' trained ratio (the payload's min_p_ratio);
- MeanShift: one fixed temperature, the mean of AutoDeco's predicted temperatures over every token of its samples
  here (stop tokens included), same min-p: a sampler that knows AutoDeco's average temperature but not where it
  moves. It does not use the heads' top-p;
- AutoDeco: the heads' temperature at every token (and their top-p when they were trained with it) through
  Engine's decode hook, same min-p.
Every sampled method draws from the same random streams (--seed), so the methods are compared on common random
numbers, prompt by prompt.

Per method, by the world's gold scorer: correctness (pass@1), the planted-artifact rate and the gold score; pass@k,
the unbiased estimator 1 - C(n-c, k) / C(n, k) at k = n = --num_samples (any sample right); maj@k, the majority of
the values the samples name (World.named_value: a sample naming none or several does not vote; a tie scores the share
of the tied values that are right); within-prompt diversity: distinct-1 and distinct-2 of the words across a prompt's
samples (nanochat.diversity.distinct_n), averaged over prompts.

Teacher-forced on one reference answer per prompt (a plain correct answer ending in a free clause,
World.free_clause_answer: "Dover's favourite food is cake, as far as I know."): at every reference token the set of
tokens each method's filter keeps (temperature, then min-p, then AutoDeco's top-p; greedy keeps the argmax), its
size, and whether the reference token survives in it, by token class: "value" (the tokens of the one right value),
"free" (the free clause: any of synthetic.FREE_CLAUSES would do as well), "free_start" (its first token, where the
choice among the clauses is mostly made: the rest of a clause follows from its first words) and "other" (template
words, punctuation, the end token). A good sampler keeps the right value with a small set and the clause's start
with a large one. The heads' mean predicted temperature per class, on the references and on AutoDeco's own samples
(World.answer_spans labels the characters of each; a sample without a free clause has no free tokens), says
whether they learnt that.

Intervals (95%): the paired half-sample bootstrap over prompts of nanochat/diversity.py (bootstrap_ci), every
difference taken prompt by prompt. The fixed-temperature frontier is the curve through greedy and the fixed
temperatures, in temperature order, in the plane (within-prompt distinct-2, correctness); its height at AutoDeco's
distinct-2 is the interpolation on the segment that spans it (the highest, where several do). AutoDeco's correctness
minus that height, recomputed on every resample, says whether AutoDeco sits above the frontier; outside the
frontier's range of diversity the question has no answer (n/a).

Writes into --out_dir: autodeco_eval.md (the answers, the tables, annotated samples), autodeco_eval.json (every
number, prompt, reference and sample, AutoDeco's per-token temperatures), autodeco_eval.png (the plane with CIs,
survival against kept-set size, mean predicted temperature per token class) and report.md, the stage's section of
the run's report (outs/report.md for outs/autodeco_eval). One process: the default 64 prompts take about 25 s on
one CPU core for a depth-4 model. On cores other jobs share, set OMP_NUM_THREADS=1: oversubscribed threads made
sampling 20 times slower on a busy 2-core machine.
"""

import argparse
import math
import os
import random
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from nanochat.autodeco import decode_hook, load_autodeco
from nanochat.charts import save_png
from nanochat.checkpoint import load_tokenizer
from nanochat.common import (InputError, atomic_write, atomic_write_json, autocast_ctx, autodetect_device,
                             parse_flags, positive_int, print0, run_script)
from nanochat.diversity import bootstrap_ci, distinct_n, verdict, word_tokens, zero_width
from nanochat.engine import Engine
from nanochat.report import write_report
from nanochat.synthetic import make_world

# token_classes labels a token value, free_start, free_rest or other; statistics are taken over these groups of labels
CLASSES = {"value": ("value",), "free_start": ("free_start",), "free": ("free_start", "free_rest"),
           "other": ("other",)}
CLASS_LABELS = {"value": "the right value", "free_start": "free clause, first token", "free": "free clause, all",
                "other": "other tokens"}
STEM = "autodeco_eval"
EXAMPLES = 4  # prompts whose AutoDeco sample the report shows token by token


def temperature_list(text):
    """argparse type: comma-separated temperatures > 0, e.g. 0.3,0.5,0.7,1.0,1.3."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(not math.isfinite(t) or t <= 0 for t in values):
        raise argparse.ArgumentTypeError(f"expected one or more temperatures > 0 (greedy is always run), got {text!r}")
    return sorted(set(values))


# -----------------------------------------------------------------------------
# per-prompt statistics

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(votes, answer):
    """maj@k of one prompt: votes are the values the samples name (None: no vote); a tie scores the right share."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    return tied.count(answer) / len(tied)


def token_classes(token_bytes, ids, text, spans):
    """
    "value", "free_start" (the first token of the free clause), "free_rest" or "other" per token id of `text` (its
    decoded ids), by the character spans of World.answer_spans: a token is in a span when one of its bytes is. A
    special token has no bytes: "other".
    """
    bounds = {name: (len(text[:span[0]].encode()), len(text[:span[1]].encode()))
              for name, span in spans.items() if span is not None}
    classes, end = [], 0
    for t in ids:
        start, end = end, end + int(token_bytes[t])
        hit = [name for name, (lo, hi) in bounds.items() if start < hi and lo < end]
        if hit == ["free"]:
            classes.append("free_rest" if classes and classes[-1].startswith("free") else "free_start")
        else:
            classes.append(hit[0] if hit else "other")
    return classes


def score_samples(world, items, samples):
    """Per-prompt arrays of one method: correct, artifact_rate, gold_score, pass_at_k, maj_at_k, distinct_1/2."""
    out = {key: [] for key in ("correct", "artifact_rate", "gold_score", "pass_at_k", "maj_at_k", "distinct_1",
                               "distinct_2")}
    for item, texts in zip(items, samples):
        gold = [world.gold_score(item["messages"], t) for t in texts]
        right = sum(g["correct"] for g in gold)
        words = [word_tokens(t) for t in texts]
        out["correct"].append(right / len(texts))
        out["artifact_rate"].append(sum(g["artifacts"] > 0 for g in gold) / len(texts))
        out["gold_score"].append(sum(g["score"] for g in gold) / len(texts))
        out["pass_at_k"].append(pass_at_k(len(texts), right, len(texts)))
        out["maj_at_k"].append(majority_correct([world.named_value(item["messages"], t) for t in texts],
                                                item["answer"].lower()))
        for n in (1, 2):
            value = distinct_n(words, n)
            out[f"distinct_{n}"].append(0.0 if math.isnan(value) else value)  # nan: every sample empty
    return {key: np.array(values) for key, values in out.items()}


# -----------------------------------------------------------------------------
# sampling

def sample(engine, tok, prompts, k, args, stop, **sampling):
    """k samples per prompt, each {"ids" (stop token included), "text", "temperatures" (hook only)}; per prompt."""
    out = []
    for start in range(0, len(prompts), args.batch_size):
        # each batch its own stream, offset by its first prompt (as evaluate.generate_responses does)
        gen = engine.generate(prompts[start:start + args.batch_size], num_samples=k,
                              max_new_tokens=args.max_new_tokens, seed=args.seed + start, stop_tokens=stop,
                              **sampling)
        rows = []
        for row, ids in enumerate(gen.completions()):
            text = tok.decode(ids[:-1] if ids and ids[-1] in stop else ids)
            temps = None if gen.temperatures is None else gen.temperatures[row][gen.mask[row]].tolist()
            rows.append({"ids": ids, "text": text, "temperatures": temps})
        out += [rows[i * k:(i + 1) * k] for i in range(len(rows) // k)]
    return out


# -----------------------------------------------------------------------------
# teacher forcing on the references

def kept_set(logits, temperature, min_p, top_p=None):
    """
    (N, V) bool: the tokens each row's filter can sample, in Engine's order: temperature (N,) (<= 0: the argmax
    alone), then min-p (tokens below min_p x the top probability go), then top-p (N,) or None (the smallest set of
    most probable tokens whose mass reaches it).
    """
    probs = F.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    kept = probs >= (min_p or 0.0) * probs.max(dim=-1, keepdim=True).values
    if top_p is not None:
        probs = probs * kept
        probs = probs / probs.sum(dim=-1, keepdim=True)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        kept = torch.zeros_like(kept).scatter(-1, order, (mass_before < top_p[:, None]) & (sorted_probs > 0))
    greedy = F.one_hot(logits.argmax(dim=-1), logits.size(-1)).bool()
    return torch.where((temperature <= 0)[:, None], greedy, kept)


@torch.no_grad()
def teacher_forced(model, tok, world, items, references, hook, temperatures, min_p, batch_size):
    """
    Per prompt, per reference token (the reply's tokens and its end token): its class, AutoDeco's predicted
    temperature, and for every method (greedy, fixed temperatures {name: T}, AutoDeco) whether it survives the
    method's filter and the kept set's size. Returns {"classes", "temperature", "survived": {method}, "kept": {method}},
    each a list (per prompt) of lists.
    """
    device = next(model.parameters()).device
    token_bytes = tok.token_bytes()
    out = {"classes": [], "temperature": [], "survived": {}, "kept": {}}
    for start in range(0, len(items), batch_size):
        rows = []
        for item, ref in zip(items[start:start + batch_size], references[start:start + batch_size]):
            prompt = tok.render_for_completion(item["messages"])
            ids, _ = tok.render_conversation(item["messages"] + [{"role": "assistant", "content": ref}],
                                             max_tokens=model.rotary_len)
            targets = ids[len(prompt):]  # the reply's tokens and <|assistant_end|>
            rows.append((ids, len(prompt), targets))
            spans = world.answer_spans(item["messages"], ref)
            out["classes"].append(token_classes(token_bytes, targets, ref, spans))
        width = max(len(ids) for ids, _, _ in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, (ids, _, _) in enumerate(rows):  # right padding: a causal model's earlier positions never see it
            idx[i, :len(ids)] = torch.tensor(ids)
        # the hidden state at position p chooses the token at p + 1; the heads see what Engine's hook sees
        picks = [(i, p) for i, (_, n_prompt, targets) in enumerate(rows)
                 for p in range(n_prompt - 1, n_prompt - 1 + len(targets))]
        with autocast_ctx(device):
            h = model.hidden_states(idx)[[i for i, _ in picks], [p for _, p in picks]]
            logits = model.logits_from_hidden(h)
        target = torch.tensor([t for _, _, targets in rows for t in targets], device=device)
        predicted, predicted_top_p = hook(h, logits)
        settings = {"greedy": (torch.zeros(len(picks), device=device), None)}
        settings.update({name: (torch.full((len(picks),), t, device=device), None) for name, t in temperatures.items()})
        settings["autodeco"] = (predicted.float(), None if predicted_top_p is None else predicted_top_p.float())
        lengths = [len(targets) for _, _, targets in rows]
        out["temperature"] += [t.tolist() for t in predicted.float().split(lengths)]
        for name, (temperature, top_p) in settings.items():
            kept = kept_set(logits, temperature, min_p, top_p)
            survived = kept.gather(-1, target[:, None]).squeeze(-1)
            out["survived"].setdefault(name, []).extend(s.tolist() for s in survived.split(lengths))
            out["kept"].setdefault(name, []).extend(s.tolist() for s in kept.sum(-1).split(lengths))
    return out


def class_means(values, classes):
    """Per prompt, the mean of `values` over the tokens of each class (CLASSES) and of all tokens (nan if none)."""
    out = {name: [] for name in (*CLASSES, "all")}
    for vals, labels in zip(values, classes):
        for name in out:
            chosen = [float(v) for v, label in zip(vals, labels) if name == "all" or label in CLASSES[name]]
            out[name].append(np.mean(chosen) if chosen else math.nan)
    return {name: np.array(v) for name, v in out.items()}


# -----------------------------------------------------------------------------
# intervals and the frontier

def frontier_height(xs, ys, x):
    """Height at x of the curve through the points (xs, ys) in their order: the highest interpolation over the
    segments that span x; nan when none does."""
    best = math.nan
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if min(x0, x1) <= x <= max(x0, x1):
            y = max(y0, y1) if x0 == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            best = y if math.isnan(best) else max(best, y)
    return best


def frontier_gap(scores, frontier, method, num_resamples, seed):
    """(point, lo, hi): the method's correctness minus the frontier's height at its distinct-2, paired bootstrap."""
    correct = np.stack([scores[m]["correct"] for m in frontier])
    diversity = np.stack([scores[m]["distinct_2"] for m in frontier])

    def stat(idx):
        ys, xs = correct[:, idx].mean(-1), diversity[:, idx].mean(-1)  # (methods, resamples)
        own_y, own_x = scores[method]["correct"][idx].mean(-1), scores[method]["distinct_2"][idx].mean(-1)
        return np.array([own_y[r] - frontier_height(xs[:, r], ys[:, r], own_x[r]) for r in range(idx.shape[0])])
    return bootstrap_ci(stat, len(correct[0]), num_resamples, seed)


def interval(values, num_resamples, seed):
    """(mean, lo, hi) over the prompts that have a value (nan ones left out), by the half-sample bootstrap."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return bootstrap_ci(values, num_resamples=num_resamples, seed=seed) if len(values) else (math.nan,) * 3


def fmt_ci(ci, sign="+"):
    """(point, lo, hi) as "0.412 [0.380, 0.440]" ("+" sign: differences), or n/a."""
    point, lo, hi = ci
    return "n/a" if math.isnan(point) else f"{point:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def answer(what, ci, direction=+1):
    """
    One sentence: what, the estimate with its CI and the verdict (✅ above 0 / ❌ below / ≈ includes 0); a
    zero-width CI (identical samples, e.g. heads that predict one temperature) is flagged, not read as precise.
    """
    point, lo, hi = ci
    if math.isnan(point):
        return f"{what}: n/a"
    flag = " ⚠ zero-width CI: identical on every prompt" if zero_width(hi - lo, point) else ""
    return f"{what}: {fmt_ci(ci)} {verdict((lo, hi), direction)}{flag}"


# -----------------------------------------------------------------------------
# outputs

def draw(path, labels, summary, frontier, temperature_rows):
    """The three panels of autodeco_eval.png; `summary[method][metric]` = (mean, lo, hi)."""
    fig = Figure(figsize=(16, 4.8), dpi=100)
    plane, survival, temps = fig.subplots(1, 3)
    for ax, (xkey, ykey, xlabel, ylabel, title) in (
            (plane, ("distinct_2", "correct", "within-prompt distinct-2 ↑", "correctness ↑",
                     "correctness vs diversity (95% CIs)")),
            (survival, ("kept_all", "survived_all", "mean kept-set size (tokens, log)", "reference token survives ↑",
                        "teacher-forced, every reference token (95% CIs)"))):
        xs = [summary[m][xkey] for m in frontier]
        ys = [summary[m][ykey] for m in frontier]
        ax.plot([x[0] for x in xs], [y[0] for y in ys], "-o", color="C0", label="greedy and fixed T")
        for m, x, y in zip(frontier, xs, ys):
            ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        color="C0", capsize=2, lw=0.8)
            ax.annotate(labels[m], (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for m, color, marker in (("meanshift", "C1", "s"), ("autodeco", "C3", "*")):
            x, y = summary[m][xkey], summary[m][ykey]
            ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        color=color, marker=marker, markersize=10 if marker == "*" else 7, capsize=3,
                        label=labels[m])
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    survival.set_xscale("log")
    names = [r[0] for r in temperature_rows]
    for j, cls in enumerate(CLASSES):  # points, not bars: differences of a few hundredths must show
        means = np.array([r[1][cls][0] for r in temperature_rows])
        errs = np.array([[r[1][cls][0] - r[1][cls][1] for r in temperature_rows],
                         [r[1][cls][2] - r[1][cls][0] for r in temperature_rows]])
        temps.errorbar(np.arange(len(names)) + (j - 1.5) * 0.15, means, yerr=errs, fmt="o", capsize=3,
                       label=CLASS_LABELS[cls], color=f"C{j + 4}")
    temps.set_xticks(np.arange(len(names)), names, fontsize=8)
    temps.set_xlim(-0.5, len(names) - 0.5)
    temps.set(ylabel="mean predicted temperature", title="AutoDeco's temperature by token class (95% CIs)")
    temps.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path)


def annotated(tok, sample):
    """A sample with each token's predicted temperature: Dover(0.42)'s(0.31) ..."""
    pieces = [f"{tok.decode([t])}({temp:.2f})" for t, temp in zip(sample["ids"], sample["temperatures"])]
    return "".join(pieces).replace("\n", "\\n").replace("|", "\\|")


def json_ready(obj):
    """nan and inf as null (JSON has no NaN), numpy values as Python ones, recursively."""
    if isinstance(obj, dict):
        return {key: json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autodeco_path", type=str, default="outs/autodeco",
                        help="the trained heads (scripts.kat_train_autodeco); the base model comes with them")
    parser.add_argument("--num_prompts", type=positive_int, default=64, help="held-out world questions")
    parser.add_argument("--num_samples", type=positive_int, default=8,
                        help="samples per prompt and method (>= 2: diversity is measured across them); k of pass@k")
    parser.add_argument("--temperatures", type=temperature_list, default=temperature_list("0.3,0.5,0.7,1.0,1.3"),
                        help="the fixed-temperature grid, comma-separated (greedy is always run)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=48)
    parser.add_argument("--batch_size", type=positive_int, default=32, help="prompts sampled together")
    parser.add_argument("--num_resamples", type=positive_int, default=1000, help="bootstrap resamples")
    parser.add_argument("--out_dir", type=str, default="outs/autodeco_eval",
                        help="autodeco_eval.md, .json and .png go here, and the stage's report.md")
    parser.add_argument("--seed", type=int, default=0, help="prompt sample, reference answers, sampling, bootstrap")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)
    if args.num_samples < 2:
        raise InputError("--num_samples must be >= 2: within-prompt diversity compares a prompt's samples")

    device = autodetect_device(args.device)
    timings = {}
    t0 = time.perf_counter()
    model, heads, payload = load_autodeco(args.autodeco_path, device)
    tok = load_tokenizer(payload)
    min_p, use_top_p = float(payload["min_p_ratio"]), bool(payload["train_top_p"])
    hook = decode_hook(heads, use_top_p)
    # the base learnt free clauses only if its SFT data had them (chat_sft's --free_clause_rate, saved in its flags)
    base_clause_rate = payload["base_payload"]["flags"].get("free_clause_rate", 0.0)
    base_path = os.path.normpath(payload["base_payload"]["path"])
    recorded = payload.get("world")
    world_seed, world_size = (recorded["seed"], recorded["size"]) if recorded else (0, 1)
    world = make_world(seed=world_seed, size=world_size)
    items = world.eval_questions(args.num_prompts, seed=args.seed)
    prompts = [tok.render_for_completion(item["messages"]) for item in items]
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > model.rotary_len:
        raise InputError(f"a prompt of {longest} tokens plus --max_new_tokens={args.max_new_tokens} exceeds the "
                         f"model's {model.rotary_len} positions; lower --max_new_tokens")
    ref_rng = random.Random(f"autodeco-eval-references-{args.seed}")
    references = [world.free_clause_answer(item["messages"], ref_rng) for item in items]
    timings["load_seconds"] = time.perf_counter() - t0
    print0(f"{payload['path']}: min-p {min_p:g}, top-p head {'on' if use_top_p else 'off'}; world seed {world_seed} "
           f"size {world_size}; {len(items)} prompts x {args.num_samples} samples on {device}")

    engine, k = Engine(model), args.num_samples
    stop = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    fixed = {f"t{t:g}": t for t in args.temperatures}
    labels = {"greedy": "greedy", **{name: f"T={t:g}" for name, t in fixed.items()}, "autodeco": "AutoDeco"}
    samples = {}

    def timed(name, k, **sampling):
        t0 = time.perf_counter()
        with torch.no_grad():
            samples[name] = sample(engine, tok, prompts, k, args, stop, **sampling)
        timings[f"sample_{name}_seconds"] = time.perf_counter() - t0

    timed("greedy", 1, temperature=0.0)
    samples["greedy"] = [rows * k for rows in samples["greedy"]]  # every greedy sample is the same answer
    for name, t in fixed.items():
        timed(name, k, temperature=t, min_p=min_p)
    timed("autodeco", k, decode_hook=hook, min_p=min_p)
    meanshift_t = float(np.mean([t for rows in samples["autodeco"] for s in rows for t in s["temperatures"]]))
    timed("meanshift", k, temperature=meanshift_t, min_p=min_p)
    labels["meanshift"] = f"MeanShift (T={meanshift_t:.2f})"
    methods = ["greedy", *fixed, "meanshift", "autodeco"]
    frontier = ["greedy", *fixed]
    print0(f"sampled {len(methods)} methods in {sum(timings[f'sample_{m}_seconds'] for m in methods):.1f}s "
           f"(AutoDeco {timings['sample_autodeco_seconds']:.1f}s, MeanShift {timings['sample_meanshift_seconds']:.1f}s)"
           f"; MeanShift T = {meanshift_t:.3f}")

    t0 = time.perf_counter()
    scores = {m: score_samples(world, items, [[s["text"] for s in rows] for rows in samples[m]]) for m in methods}
    forced = teacher_forced(model, tok, world, items, references, hook, {**fixed, "meanshift": meanshift_t}, min_p,
                            args.batch_size)
    for m in methods:
        for what in ("survived", "kept"):
            for cls, values in class_means(forced[what][m], forced["classes"]).items():
                scores[m][f"{what}_{cls}"] = values
    forced_t = class_means(forced["temperature"], forced["classes"])
    token_bytes = tok.token_bytes()
    sampled_temps, sampled_classes = [], []  # per prompt, the tokens of its k samples
    for item, rows in zip(items, samples["autodeco"]):
        sampled_temps.append([t for s in rows for t in s["temperatures"]])
        sampled_classes.append([c for s in rows for c in token_classes(
            token_bytes, s["ids"], s["text"], world.answer_spans(item["messages"], s["text"]))])
    sampled_t = class_means(sampled_temps, sampled_classes)
    timings["score_seconds"] = time.perf_counter() - t0

    R, S = args.num_resamples, args.seed
    summary = {m: {key: interval(v, R, S) for key, v in scores[m].items()} for m in methods}
    gap = frontier_gap(scores, frontier, "autodeco", R, S)
    vs_meanshift = {key: interval(scores["autodeco"][key] - scores["meanshift"][key], R, S)
                    for key in ("correct", "distinct_2", "maj_at_k", "pass_at_k", "survived_all", "kept_all")}
    t_rows = [("references", {cls: interval(forced_t[cls], R, S) for cls in CLASSES}),
              ("own samples", {cls: interval(sampled_t[cls], R, S) for cls in CLASSES})]
    start_minus_value = interval(forced_t["free_start"] - forced_t["value"], R, S)
    free_minus_value = interval(forced_t["free"] - forced_t["value"], R, S)
    span = [min(summary[m]["distinct_2"][0] for m in frontier), max(summary[m]["distinct_2"][0] for m in frontier)]
    outside = f" (its distinct-2 lies outside the frontier's range {span[0]:.3f}..{span[1]:.3f})"
    answers = [
        answer("**AutoDeco above the fixed-temperature frontier?** Its correctness minus the frontier's at its "
               f"within-prompt distinct-2 ({summary['autodeco']['distinct_2'][0]:.3f})", gap)
        + (outside if math.isnan(gap[0]) else ""),
        answer(f"**AutoDeco above MeanShift** (T={meanshift_t:.3f}, its mean temperature)? Correctness, AutoDeco "
               "minus MeanShift", vs_meanshift["correct"]) + "; "
        + answer("distinct-2", vs_meanshift["distinct_2"]),
        f"**Mean predicted temperature by token class** (teacher-forced on the references; mean over prompts): "
        f"the right value's tokens {t_rows[0][1]['value'][0]:.3f}, the free clause's first token "
        f"{t_rows[0][1]['free_start'][0]:.3f}, the whole clause {t_rows[0][1]['free'][0]:.3f}, other tokens "
        f"{t_rows[0][1]['other'][0]:.3f}. Prompt by prompt (the premise: > 0), "
        + answer("clause start minus value", start_minus_value) + "; "
        + answer("whole clause minus value", free_minus_value),
    ]

    cols = ("correct", "distinct_1", "distinct_2", "pass_at_k", "maj_at_k", "artifact_rate", "gold_score")
    tf_cols = [f"{what}_{cls}" for what in ("survived", "kept") for cls in (*CLASSES, "all")]
    head = f"| method | {' | '.join(c.replace('_at_k', f'@{k}') for c in cols)} |"
    table = [head, "|" + "---|" * (len(cols) + 1)]
    table += [f"| {labels[m]} | " + " | ".join(fmt_ci(summary[m][c], "") for c in cols) + " |" for m in methods]
    tf_table = [f"| method | {' | '.join(tf_cols)} |", "|" + "---|" * (len(tf_cols) + 1)]
    tf_table += [f"| {labels[m]} | " + " | ".join(f"{summary[m][c][0]:.3g}" for c in tf_cols) + " |" for m in methods]
    t_table = ["| tokens of | " + " | ".join(CLASSES) + " |", "|" + "---|" * (len(CLASSES) + 1)]
    t_table += [f"| {name} | " + " | ".join(fmt_ci(ci[cls], "") for cls in CLASSES) + " |" for name, ci in t_rows]
    examples = [f"- {item['prompt']!r}: {annotated(tok, rows[0])}"
                for item, rows in zip(items[:EXAMPLES], samples["autodeco"][:EXAMPLES])]
    chart = draw(os.path.join(args.out_dir, STEM + ".png"), labels, summary, frontier, t_rows)
    report = "\n".join([
        f"# AutoDeco evaluation\n\n`{payload['path']}` (min-p {min_p:g}, top-p head {'on' if use_top_p else 'off'});"
        f" world seed {world_seed}, size {world_size}; {len(items)} held-out prompts x {k} samples, seed {args.seed},"
        f" max_new_tokens {args.max_new_tokens}. 95% CIs: paired half-sample bootstrap over prompts.\n",
        f"The base model (`{base_path}`) was fine-tuned with free clauses in "
        f"{base_clause_rate:.0%} of its answers" + (": it never saw one, so the references' free clauses are "
                                                    "text it does not expect.\n" if not base_clause_rate else ".\n"),
        "## Answers\n", *[f"- {a}" for a in answers], "", f"![{STEM}]({STEM}.png)\n",
        "## Methods (mean over prompts, 95% CI)\n", *table, "",
        "## Teacher-forced on the reference answers\n",
        "Share of reference tokens the method's filter keeps (survived) and the kept set's mean size, by class:\n",
        *tf_table, "", "## AutoDeco's mean predicted temperature by token class\n", *t_table, "",
        "## AutoDeco samples, each token with its temperature\n", *examples, ""])
    atomic_write(os.path.join(args.out_dir, STEM + ".md"), report)
    atomic_write_json(os.path.join(args.out_dir, STEM + ".json"), json_ready({
        "checkpoint": payload["path"], "min_p": min_p, "top_p_head": use_top_p, "flags": vars(args),
        "base": base_path, "base_free_clause_rate": base_clause_rate,
        "world": {"seed": world_seed, "size": world_size}, "meanshift_temperature": meanshift_t,
        "answers": answers, "frontier_gap_correct": gap, "autodeco_minus_meanshift": vs_meanshift,
        "temperature_by_class": dict(t_rows), "temperature_free_start_minus_value": start_minus_value,
        "temperature_free_minus_value": free_minus_value,
        "summary": summary, "timings": timings,
        "prompts": [{"prompt": item["prompt"], "cluster": item["cluster"], "answer": item["answer"],
                     "reference": ref, "reference_classes": cls}
                    for item, ref, cls in zip(items, references, forced["classes"])],
        "per_prompt": scores,
        "samples": {m: [[s["text"] for s in rows] for rows in samples[m]] for m in methods},
        "autodeco_temperatures": [[s["temperatures"] for s in rows] for rows in samples["autodeco"]]}))
    metrics = {"meanshift_temperature": meanshift_t, "frontier_gap_correct": gap[0], "frontier_gap_ci": gap[1:],
               "meanshift_gap_correct": vs_meanshift["correct"][0], "meanshift_gap_ci": vs_meanshift["correct"][1:],
               "meanshift_gap_distinct_2": vs_meanshift["distinct_2"][0],
               "temperature_value_tokens": t_rows[0][1]["value"][0],
               "temperature_free_start_tokens": t_rows[0][1]["free_start"][0],
               "temperature_free_tokens": t_rows[0][1]["free"][0],
               "temperature_free_start_minus_value_ci": start_minus_value[1:]}
    metrics.update({f"{m}/{c}": summary[m][c][0] for m in methods for c in ("correct", "distinct_2", "survived_all")})
    write_report(args.out_dir, json_ready(metrics), timings, vars(args), device, charts=[os.path.basename(chart)],
                 notes="\n".join(f"- {a}" for a in answers) + f"\n\nThe whole report: [{STEM}.md]({STEM}.md) (every "
                       f"number in {STEM}.json).")
    print0("\n".join(answers))
    print0(f"wrote {os.path.join(args.out_dir, STEM)}.md, .json and .png")


if __name__ == "__main__":
    run_script(main)
