"""
STaR's library (nanochat/star.py): sampling records, the training data built from them, the likelihood reward and
the metrics. Each test names the bug it is there to catch.
"""

import pytest
import torch

from conftest import make_tiny_model
from nanochat import star
from nanochat.loaders import SFTLoader
from nanochat.mcqa import make_item, score
from nanochat.pairs import check_pair
from nanochat.preference import split_pair

ITEM = make_item("t/0", "Which colour is the sky?", ["red", "green", "blue", "black"], "C", "physics", "en")
PREAMBLE = "Answer."  # short prompts keep the tiny model's sequences short


def item(i, subject="physics", answer="C"):
    return make_item(f"t/{i}", f"Question number {i}?", ["one", "two", "three", "four"], answer, subject, "en")


def record(it, responses, mentions_hint=False):
    """A record as sample_rationales makes it, from given responses."""
    samples = [{"response": r, "answer": None, "score": score(it, r), "degenerate": False,
                "mentions_hint": mentions_hint} for r in responses]
    return {"item": it, "messages": star.question_messages(it), "samples": samples}


# -----------------------------------------------------------------------------
# training data from records

def test_dpo_pairs_are_exactly_the_correct_times_incorrect_products_of_contested_questions(tok):
    # catches: pairing by zip instead of product, chosen and rejected swapped, pairs from uncontested questions,
    # rows that the pairs format (and so the DPO stage) refuses
    q1 = record(item(1), ["Because. Answer: C", "Think. Answer: C", "Hmm. Answer: A"])
    q2 = record(item(2), ["Answer: C", "So Answer: C"])
    q3 = record(item(3), ["Answer: A", "Answer: B", "no answer"])
    assert star.contested([q1, q2, q3]) == [q1]
    rows = star.dpo_pairs([q1, q2, q3])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("Because. Answer: C", "Hmm. Answer: A"),
                                                           ("Think. Answer: C", "Hmm. Answer: A")]
    assert all(check_pair(r) is None for r in rows)
    assert {r["src"] for r in rows} == {"star"} and len({r["id"] for r in rows}) == 2
    assert rows[0]["messages"] == q1["messages"] and rows[0]["item_id"] == "t/1"
    # 2 correct x 2 incorrect -> 4; unique drops a whitespace-only repeat on either side first
    q4 = record(item(4), ["Answer: C", "Answer:  C", "Answer: A", "Answer: B", "Answer: B"])
    assert len(star.dpo_pairs([q4])) == 2 * 3 and len(star.dpo_pairs([q4], unique=True)) == 1 * 2
    # the DPO stage runs them as they are: one prompt (the question), then the chosen and the rejected reply
    for row in rows:
        prompt, replies = split_pair(tok, row)
        assert prompt == tok.render_for_completion(row["messages"])
        assert [tok.decode(r[:-1]) for r in replies] == [row["chosen"], row["rejected"]]


def test_graded_rewards_decide_success_by_the_baseline_not_the_letter(tok):
    # catches: --reward answer_logprob still selecting by the letter (score), a threshold other than the
    # no-rationale baseline (0), hinted rationales trained on, rewards stored on the wrong samples
    q = record(item(5), ["Right letter, bad reasoning. Answer: C", "Good reasoning, slip. Answer: A",
                         "Neutral. Answer: B"])
    for sample, reward in zip(q["samples"], (-0.5, 1.2, 0.0)):
        sample["reward"] = reward
    assert [m[-1]["content"] for m in star.reinforce_examples([q], graded=True)] == ["Good reasoning, slip. Answer: A"]
    assert [m[-1]["content"] for m in star.reinforce_examples([q])] == ["Right letter, bad reasoning. Answer: C"]
    pairs = star.dpo_pairs([q], graded=True)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Good reasoning, slip. Answer: A", "Right letter, bad reasoning. Answer: C"),
        ("Good reasoning, slip. Answer: A", "Neutral. Answer: B")]
    q["samples"][1]["mentions_hint"] = True
    assert star.reinforce_examples([q], graded=True) == []
    model = make_tiny_model(vocab_size=tok.vocab_size, sequence_len=256)
    fresh = record(item(6), ["Because. Answer: C", "Answer: A"])
    star.score_answer_logprob(model, tok, [fresh])
    expected = star.answer_logprob_rewards(model, tok, fresh["item"], ["Because. Answer: C", "Answer: A"])
    assert [s_["reward"] for s_ in fresh["samples"]] == pytest.approx(expected)


def test_reinforce_trains_on_the_response_tokens_only_and_unique_drops_repeats(tok):
    # catches: a loss on the question's tokens (the SFT mask), incorrect samples reinforced, duplicates kept with
    # unique, hint-citing rationales trained without the hint
    q1 = record(item(1), ["Sky. Answer: C", "Sky.  Answer: C", "Answer: A", "Other. Answer: C"])
    q2 = record(item(2), ["The hint says. Answer: C"], mentions_hint=True)
    examples = star.reinforce_examples([q1, q2])
    assert [e[-1]["content"] for e in examples] == ["Sky. Answer: C", "Sky.  Answer: C", "Other. Answer: C"]
    assert [e[-1]["content"] for e in star.reinforce_examples([q1, q2], unique=True)] == ["Sky. Answer: C",
                                                                                        "Other. Answer: C"]
    # the SFT loader's targets are exactly the response's tokens and <|assistant_end|>
    example = examples[0]
    ids, mask = tok.render_conversation(example)
    prompt = tok.render_for_completion(example[:-1])
    assert ids[:len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert tok.decode(ids[len(prompt):-1]) == example[-1]["content"]
    assert ids[-1] == tok.encode_special("<|assistant_end|>")
    inputs, targets = next(iter(SFTLoader([example], tok, batch_size=1, max_len=len(ids), train=False)))
    assert targets[0][targets[0] != -1].tolist() == ids[len(prompt):]


def test_rationalisation_hint_reaches_the_model_but_never_the_training_prompt(tok, monkeypatch):
    # catches: the hinted prompt returned (and trained on), the hint not given to the model, scoring against
    # anything but the item's answer, a hint-citing rationale counted as usable
    seen = {}

    def fake_generate(model, tok, conversations, max_new_tokens, batch_size, temperature, seed, num_samples):
        seen["prompts"] = [c[-1]["content"] for c in conversations]
        return ["So. Answer: C", "As the hint says, Answer: C", "Answer: B", "x x x x x x x x x"] * len(conversations)

    monkeypatch.setattr(star, "generate_responses", fake_generate)
    records = star.sample_rationales(None, tok, [ITEM], 4, 1.0, 16, 2, 0, hint=True)
    assert seen["prompts"] == [star.question_messages(ITEM)[0]["content"] + "\n\nHint: the answer is C."]
    [rec] = records
    assert rec["messages"] == star.question_messages(ITEM) and "Hint" not in rec["messages"][0]["content"]
    assert [s["score"] for s in rec["samples"]] == [1.0, 1.0, 0.0, 0.0]
    assert [s["answer"] for s in rec["samples"]] == ["C", "C", "B", None]
    assert [s["mentions_hint"] for s in rec["samples"]] == [False, True, False, False]
    assert [s["degenerate"] for s in rec["samples"]] == [False, False, False, True]
    data = star.reinforce_examples(records) + [row["messages"] for row in star.dpo_pairs(records)]
    assert data and all("Hint" not in m["content"] for conv in data for m in conv if m["role"] == "user")
    assert [conv[-1]["content"] for conv in star.reinforce_examples(records)] == ["So. Answer: C"]


def test_sampling_is_reproducible_with_a_seed(tok):
    # catches: an unseeded or globally seeded sampler (runs not repeatable), records out of item order.
    # Not batch-size independent: the engine draws one random stream per batch (seeded by the batch's first
    # index, as evaluate.py does), so gen_batch_size 2 and 4 draw different numbers for the same rows.
    model = make_tiny_model(vocab_size=tok.vocab_size, sequence_len=128)
    items = [item(i) for i in range(3)]

    def sample(seed):
        records = star.sample_rationales(model, tok, items, 2, 1.0, 12, 2, seed, preamble=PREAMBLE)
        return [[s["response"] for s in r["samples"]] for r in records]

    first = sample(0)
    assert sample(0) == first and sample(1) != first
    records = star.sample_rationales(model, tok, items, 2, 1.0, 12, 2, 0, preamble=PREAMBLE)
    assert [r["item"]["id"] for r in records] == ["t/0", "t/1", "t/2"]
    assert all(s["score"] == score(r["item"], s["response"]) for r in records for s in r["samples"])


# -----------------------------------------------------------------------------
# the likelihood reward

def hand_answer_logprob(model, tok, messages, reply, answer_tokens):
    """Independent reference: the whole chat rendered at once, one plain forward, the reply's last tokens summed."""
    ids, _ = tok.render_conversation(messages + [{"role": "assistant", "content": reply}])
    ids = ids[:-1]  # the <|assistant_end|>
    logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - answer_tokens, len(ids)))


def test_answer_logprob_rewards_equal_hand_sums_minus_the_no_rationale_baseline(tok):
    # catches: no baseline subtraction, an off-by-one in the scored positions, the rationale's own answer line
    # kept in the context, padding leaking into a row of the batch
    model = make_tiny_model(vocab_size=tok.vocab_size, sequence_len=128)
    rationales = ["The sky is blue.\nAnswer: A", "No idea", "First line.\nSecond line\n\nAnswer: C\nok"]
    stripped = ["The sky is blue.", "No idea", "First line.\nSecond line"]
    messages = star.question_messages(ITEM, PREAMBLE)
    n = len(tok.encode("Answer: C"))
    with torch.no_grad():
        baseline = hand_answer_logprob(model, tok, messages, "Answer: C", n)
        expected = [hand_answer_logprob(model, tok, messages, z + "\nAnswer: C", n) - baseline for z in stripped]
    for batch_size in (1, 4):
        got = star.answer_logprob_rewards(model, tok, ITEM, rationales, preamble=PREAMBLE, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(r, 4) for r in expected)) == 3 and all(r != 0 for r in expected)


def test_answer_line_uses_the_items_language():
    # catches: an English label where the prompt asked for the item's language's
    assert star.answer_line(ITEM) == "Answer: C"
    assert star.answer_line({**ITEM, "language": "yo"}) == "Ìdáhùn: C"
    assert star.answer_line({**ITEM, "language": "de"}) == "Answer: C"  # no label of its own: English
    assert star.strip_answer_line("Ronú.\nÌDÁHÙN: B", "yo") == "Ronú."


# -----------------------------------------------------------------------------
# metrics and names

def test_iteration_metrics_by_hand():
    # catches: per-question and per-sample accuracy confused, contested counting all-correct questions, rates
    # over questions instead of samples
    q1 = record(item(1, "bio"), ["Answer: C", "Answer: A", "none"])
    q2 = record(item(2, "bio"), ["Answer: C"])
    q3 = record(item(3, "law"), ["Answer: B", "none x x x x x x x x"])
    for s in q1["samples"] + q2["samples"] + q3["samples"]:
        s["answer"] = None if s["response"].startswith("none") else s["response"][-1]
    q3["samples"][1]["degenerate"] = True
    m = star.iteration_metrics([q1, q2, q3])
    assert m["questions"] == 3 and m["samples"] == 6
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["question_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m["pass_at_k"] == pytest.approx(2 / 3) and m["contested"] == pytest.approx(1 / 3)
    assert m["degenerate_rate"] == pytest.approx(1 / 6) and m["no_answer_rate"] == pytest.approx(2 / 6)
    assert m["per_subject"] == pytest.approx({"bio": 2 / 4, "law": 0.0})
    assert star.iteration_metrics([])["accuracy"] == 0.0


def test_run_name_from_key_flags():
    # catches: a flag missing from the name (two runs writing one name), a float printed unreadably
    args = {"strategy": "sft", "dataset": "mmlu_YO-NG", "lora_r": 16, "lr": 1e-4, "iterations": 3,
            "samples_per_question": 8, "temperature": 0.7, "seed": 0, "hint": True, "other": 5}
    assert star.run_name(args) == "star-sft-mmlu_YO-NG-hint-r16-lr0.0001-it3-k8-t0.7-s0"
    assert star.run_name({"strategy": "dpo", "dataset": "mmlu", "hint": False, "lora_r": None}) == "star-dpo-mmlu"
