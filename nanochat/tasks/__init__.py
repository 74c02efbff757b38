"""
Evaluation tasks for scripts/chat_eval.py. Each task (a module, or for ARC an object)
has the same shape:

    HUB_ID, DEFAULT_SPLIT, KIND      # KIND: "choice" (answer is a letter) or "generative"
    load(split=DEFAULT_SPLIT, from_dir=None, limit=None) -> list of items
    score(item, response) -> 1.0 or 0.0

An item is a dict with "messages" (a conversation ending in a user turn) plus the
task's own fields; choice items also carry "letters" (the valid option letters) and
"answer" (the correct one). from_dir=None reads the hub; otherwise DIR holds local copies
of hub repos as `huggingface-cli download <hub id> --repo-type dataset --local-dir DIR/<hub id>`
leaves them. To add a task, write a module of that shape and register it here.
"""

from nanochat.tasks import arc, gsm8k, humaneval, mmlu, world

TASKS = {
    "arc_easy": arc.ARC_EASY,
    "arc_challenge": arc.ARC_CHALLENGE,
    "mmlu": mmlu,
    "gsm8k": gsm8k,
    "humaneval": humaneval,
    "world": world,
}
