"""
STaR, the Self-Taught Reasoner (Zelikman et al. 2022), on multiple-choice QA (issue 14): one iteration samples
rationales for each question, scores them by their final answer line (nanochat/mcqa.py) and turns them into
training data. The stage script (scripts/kat_train_star.py) loops: sample -> build data -> train -> evaluate.

Records. `sample_rationales` returns one record per question:

    {"item": the mcqa item, "messages": [{"role": "user", "content": the rendered question}],
     "samples": [{"response": str, "answer": "A".."D" or None, "score": 1.0 | 0.0, "degenerate": bool,
                  "mentions_hint": bool}, ...]}

Sampling goes through evaluate.generate_responses (Engine, batched, sharded under torchrun), whose batches each
draw from their own random stream, seeded by `seed` plus the index of the batch's first question: the same
(seed, gen_batch_size) gives the same samples, but another gen_batch_size gives other ones (the engine draws one
stream per batch, not per row). A later iteration should pass another seed.

Rationalisation (STaR's step for questions the model fails): with hint=True the prompt the model sees also ends in
"Hint: the answer is C.", but the record's "messages" are the question without it, so a rationale that reaches the
hinted answer is trained as if the model had found it alone. A rationale that talks about the hint ("as the hint
says") would then teach the model to cite a hint it never sees: such samples keep their score but are flagged
`mentions_hint` and never become training data.

Training data from records:
- `reinforce_examples`: [user: question, assistant: a correct rationale] per usable correct sample. Trained
  through loaders.SFTLoader, whose tokenizer mask (tokenizer.render_conversation) is 1 on the assistant's tokens
  and its <|assistant_end|> only, so the loss never reads the question.
- `dpo_pairs`: every usable correct x every incorrect sample of each contested question (some but not all correct),
  as rows of the pairs format (nanochat/pairs.py) that nanochat/preference.py and nanochat/dpo.py train on.
- `answer_logprob_rewards`: a graded reward per rationale instead of 0/1, how much the rationale raises the
  log-probability of the correct answer line over answering at once. `score_answer_logprob` stores it in each
  sample as "reward"; reinforce_examples and dpo_pairs with graded=True then count a sample as a success when its
  reward is above 0, the no-rationale baseline, whatever letter it ended on.
"""

import torch

from nanochat import mcqa
from nanochat.batching import collate_targets
from nanochat.dpo import sequence_logprobs
from nanochat.evaluate import generate_responses
from nanochat.pairs import check_pair
from nanochat.synthetic import conversation_id, pair_id

HINT = "Hint: the answer is {letter}."
PAIR_SRC = "star"


def _norm_ws(text):
    return " ".join(text.split())


def question_messages(item, preamble=None, meta_prompt=None, hint=False):
    """The prompt conversation of one question; with hint, the correct answer is named after the options."""
    content = mcqa.render_question(item, preamble, meta_prompt)
    if hint:
        content += "\n\n" + HINT.format(letter=item["answer"])
    return [{"role": "user", "content": content}]


def sample_rationales(model, tok, items, samples_per_question, temperature, max_new_tokens, gen_batch_size, seed,
                      preamble=None, meta_prompt=None, hint=False):
    """samples_per_question sampled responses to each item, scored: one record per item (module docstring)."""
    prompts = [question_messages(item, preamble, meta_prompt, hint) for item in items]
    responses = generate_responses(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                                   temperature=temperature, seed=seed, num_samples=samples_per_question)
    records = []
    for i, item in enumerate(items):
        samples = []
        for response in responses[i * samples_per_question:(i + 1) * samples_per_question]:
            samples.append({"response": response, "answer": mcqa.extract_answer(response, item["language"]),
                            "score": mcqa.score(item, response), "degenerate": mcqa.is_degenerate(response),
                            "mentions_hint": hint and "hint" in response.lower()})
        records.append({"item": item, "messages": question_messages(item, preamble, meta_prompt), "samples": samples})
    return records


def _good(sample, graded=False):
    """A sample that counts as a success: a correct answer, or with graded rewards (score_answer_logprob) a
    rationale that makes the correct answer more likely than answering at once (reward > 0, the baseline)."""
    return sample["reward"] > 0 if graded else sample["score"] >= 1


def _usable(sample, graded=False):
    """A success that may be trained on (not one that leans on a hint it will not see)."""
    return _good(sample, graded) and not sample["mentions_hint"]


def _unique(responses):
    """Responses with whitespace-only duplicates dropped, first occurrence kept."""
    seen, out = set(), []
    for response in responses:
        if _norm_ws(response) not in seen:
            seen.add(_norm_ws(response))
            out.append(response)
    return out


def contested(records):
    """The records of questions with some but not all samples correct: the only ones with a preference signal."""
    return [r for r in records if 0 < sum(s["score"] >= 1 for s in r["samples"]) < len(r["samples"])]


def reinforce_examples(records, unique=False, graded=False):
    """
    SFT conversations [user: question, assistant: rationale], one per usable successful sample (_good), in record
    order; unique drops a question's repeated responses (a confident model samples the same rationale many times,
    which would otherwise weigh that question more).
    """
    examples = []
    for record in records:
        correct = [s["response"] for s in record["samples"] if _usable(s, graded)]
        for response in _unique(correct) if unique else correct:
            examples.append(record["messages"] + [{"role": "assistant", "content": response}])
    return examples


def dpo_pairs(records, unique=False, graded=False):
    """
    Preference rows of the contested questions: every usable successful sample (chosen) x every unsuccessful one
    (rejected), in sample order (successful: _good). A product row the pairs format refuses (check_pair: an empty
    reply, or two replies equal up to whitespace) is left out. unique first drops repeated responses on each side.
    """
    rows = []
    # no contested() filter needed: an all-correct question has nothing to reject, an all-wrong one nothing to choose
    for record in records:
        messages, item = record["messages"], record["item"]
        chosen = [s["response"] for s in record["samples"] if _usable(s, graded)]
        rejected = [s["response"] for s in record["samples"] if not _good(s, graded)]
        if unique:
            chosen, rejected = _unique(chosen), _unique(rejected)
        for c in chosen:
            for r in rejected:
                row = {"id": pair_id(PAIR_SRC, messages, c, r), "prompt": messages[-1]["content"],
                       "messages": messages, "chosen": c, "rejected": r, "src": PAIR_SRC,
                       "prompt_id": conversation_id(messages), "item_id": item["id"], "subject": item["subject"]}
                if check_pair(row) is None:
                    rows.append(row)
    return rows


def answer_line(item):
    """The correct answer line in the item's language ("Answer: C"; English where the language has no label)."""
    label = (mcqa.ANSWER_LABELS.get(item["language"]) or mcqa.ANSWER_LABELS["en"])[0]
    return f"{label}: {item['answer']}"


def strip_answer_line(response, language="en"):
    """The response without its last answer line and what follows it (the whole response if it has none)."""
    lines = response.split("\n")
    pattern = mcqa.answer_pattern(language)
    hits = [i for i, line in enumerate(lines) if pattern.search(mcqa.plain(line))]
    return "\n".join(lines[:hits[-1]]).rstrip() if hits else response.rstrip()


@torch.no_grad()
def answer_logprob_rewards(model, tok, item, rationales, preamble=None, meta_prompt=None, batch_size=32):
    """
    r(x, z) = log p(answer line | x, z) - log p(answer line | x) for each rationale z (list of floats): how much the
    rationale, cut before its own answer line, raises the log-probability of the correct answer line (answer_line)
    over the reply that is the answer line alone. Only the answer line's tokens are scored, teacher-forced.

    The pieces are encoded separately (prompt, rationale + "\\n", answer line), so both terms score the same answer
    tokens; the tokenizer's pre-split breaks at the newline and the word after it anyway, so this is how the whole
    text would be encoded too.
    """
    device = next(model.parameters()).device
    prompt = tok.render_for_completion(question_messages(item, preamble, meta_prompt))
    answer = tok.encode(answer_line(item))
    contexts = [[]] + [tok.encode(strip_answer_line(z, item["language"]) + "\n") for z in rationales]
    rendered = [(prompt + c + answer, [0] * (len(prompt) + len(c)) + [1] * len(answer)) for c in contexts]
    logprobs = []
    for start in range(0, len(rendered), batch_size):
        inputs, targets = collate_targets(rendered[start:start + batch_size], device)
        logprobs += sequence_logprobs(model, inputs, targets).tolist()
    return [lp - logprobs[0] for lp in logprobs[1:]]


def score_answer_logprob(model, tok, records, preamble=None, meta_prompt=None, batch_size=32):
    """Give every sample of the records its graded reward, answer_logprob_rewards of its response, as "reward"."""
    for record in records:
        rewards = answer_logprob_rewards(model, tok, record["item"], [s["response"] for s in record["samples"]],
                                         preamble, meta_prompt, batch_size)
        for sample, reward in zip(record["samples"], rewards):
            sample["reward"] = reward


def iteration_metrics(records):
    """
    One iteration's sampling statistics: accuracy over all samples and as the mean of per-question accuracies,
    pass@k (share of questions with a correct sample), contested share, degeneration and no-answer rates, and the
    sample accuracy per subject.
    """
    samples = [s for r in records for s in r["samples"]]
    n, q = max(len(samples), 1), max(len(records), 1)
    per_question = [sum(s["score"] for s in r["samples"]) / max(len(r["samples"]), 1) for r in records]
    by_subject = {}
    for r in records:
        by_subject.setdefault(r["item"]["subject"], []).extend(s["score"] for s in r["samples"])
    return {"questions": len(records), "samples": len(samples),
            "accuracy": sum(s["score"] for s in samples) / n,
            "question_accuracy": sum(per_question) / q,
            "pass_at_k": sum(a > 0 for a in per_question) / q,
            "contested": len(contested(records)) / q,
            "degenerate_rate": sum(s["degenerate"] for s in samples) / n,
            "no_answer_rate": sum(s["answer"] is None for s in samples) / n,
            "per_subject": {subject: sum(v) / len(v) for subject, v in sorted(by_subject.items()) if v}}


# flag -> its short form in a run name, in the order it is written
RUN_NAME_KEYS = (("strategy", ""), ("dataset", ""), ("hint", "hint"), ("lora_r", "r"), ("lr", "lr"),
                 ("iterations", "it"), ("samples_per_question", "k"), ("temperature", "t"), ("seed", "s"))


def run_name(args):
    """
    A run name from the key flags of a dict of arguments, e.g. "star-sft-mmlu-r16-lr0.0001-it3-k8-t0.7-s0";
    flags that are missing or None are left out, a false hint too (a true one adds "hint").
    """
    parts = ["star"]
    for key, short in RUN_NAME_KEYS:
        value = args.get(key)
        if value is None or value is False:
            continue
        if value is True:
            parts.append(short)
        else:
            parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
    return "-".join(str(p).replace("/", "_") for p in parts)
