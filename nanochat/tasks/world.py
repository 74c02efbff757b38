"""
The synthetic world's held-out questions (nanochat/synthetic.py) as an eval task: offline and gold-scored.

Items are `make_world(seed, size).eval_questions(limit or DEFAULT_LIMIT, seed=seed)`: topic clusters drawn
uniformly, half of the prompts phrased with templates no training generator emits. A model knows only the world
it was trained on, so `seed` and `size` must be the training run's --seed and --synthetic_size
(scripts/chat_eval.py reads them from the checkpoint). `from_dir` is accepted for the common interface and
ignored: nothing is read from disk.

Items: {"messages", "prompt", "cluster", "answer", "prompt_id", "world_seed", "world_size"}.

Scoring: `score` is 1.0 when the response names the gold value and no rival value; `gold` returns the world's
whole verdict, {"correct", "artifacts", "score"}, where score = clip(correct - 0.25 * artifacts, -1, 1) also
charges the planted mode-collapse artifacts (em dashes, "not just X, but Y", stock phrases).
"""

from functools import lru_cache

from nanochat.synthetic import make_world

HUB_ID = None  # generated locally, never downloaded
DEFAULT_SPLIT = "test"
KIND = "generative"
DEFAULT_LIMIT = 200

# scoring looks the world up once per response; building it (and its prompt index) is the slow part
_world = lru_cache(maxsize=4)(make_world)


def load(split=DEFAULT_SPLIT, from_dir=None, limit=None, seed=0, size=1):
    """`limit` questions (DEFAULT_LIMIT if None) about world (seed, size); a longer list extends a shorter one."""
    if split != "test":
        raise ValueError(f"the world task has only a 'test' split, not {split!r}")
    questions = _world(seed, size).eval_questions(limit or DEFAULT_LIMIT, seed=seed)
    return [{**q, "world_seed": seed, "world_size": size} for q in questions]


def gold(item, response):
    """The world's verdict on a response: {"correct": 0/1, "artifacts": count, "score": float}."""
    return _world(item["world_seed"], item["world_size"]).gold_score(item["messages"], response)


def score(item, response):
    """1.0 if the response names the gold answer and no rival value (artifacts do not count here)."""
    return float(gold(item, response)["correct"])
