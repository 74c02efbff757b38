"""
Token-id lists to tensors: the padding, the next-token targets, the ignore index and the one truncation rule that
every stage uses. Its own module because the loaders, the reward model, DPO, density and GRPO all batch token ids,
and one rule written once cannot drift into five slightly different ones.

- `IGNORE_INDEX` marks a target that no loss reads (gpt.py's cross-entropy skips it, the token counts exclude it).
- `cut_left` shortens a render from the left and keeps its first token, the <|bos|> every render starts with: the
  end holds the question being answered (and the reply), which is what a reward, a log-prob or an embedding is
  about, and the model has only ever seen sequences that start with <|bos|>.
- `pad_right` / `pad_left`: rows of a (rows, width) tensor with a mask of the real tokens. Right padding is for
  causal reads (the pads after a row's end never reach it); left padding puts every prompt's last token in the last
  column (GRPO's groups continue from there).
- `collate_targets`: (inputs, targets) of renders, targets[t] = ids[t + 1] where the mask of token t + 1 is set,
  else IGNORE_INDEX; `collate_right`: the reward model's rows and each row's last real position.
"""

import torch

IGNORE_INDEX = -1


def cut_left(ids, max_len):
    """
    `ids` (a render, or its mask) cut from the left to at most max_len tokens: its first token, then its last
    max_len - 1. A render starts with <|bos|> (and its mask with 0), so both stay aligned and both keep it.
    max_len 0 or None: no cut.
    """
    if not max_len or len(ids) <= max_len:
        return ids
    return ids[:1] + ids[len(ids) - max_len + 1:]


def pad_right(id_lists, pad_id, width=None, rows=None):
    """
    (ids, valid): the lists as rows of a (rows, width) LongTensor, each from column 0 and followed by pad_id, and a
    bool tensor marking their real tokens. width defaults to the longest list, rows to their number; extra rows are
    padding only (every rank of a data-parallel batch gets the same shape).
    """
    rows = len(id_lists) if rows is None else rows
    width = max(len(ids) for ids in id_lists) if width is None else width
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    valid = torch.zeros(rows, width, dtype=torch.bool)
    for row, row_ids in enumerate(id_lists):
        ids[row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        valid[row, :len(row_ids)] = True
    return ids, valid


def pad_left(id_lists, pad_id):
    """(ids, valid) like pad_right, but each list ends in the last column with pad_id before it."""
    width = max(len(ids) for ids in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(id_lists), width, dtype=torch.bool)
    for row, row_ids in enumerate(id_lists):
        ids[row, width - len(row_ids):] = torch.tensor(row_ids, dtype=torch.long)
        valid[row, width - len(row_ids):] = True
    return ids, valid


def collate_targets(rendered, device="cpu", pad_id=0, width=None, rows=None):
    """
    Right-padded (inputs, targets) of renders [(ids, mask)], both (rows, width): inputs[t] = ids[t] and
    targets[t] = ids[t + 1] where mask[t + 1] is set, else IGNORE_INDEX, for t < len(ids) - 1; after that inputs
    hold pad_id and targets IGNORE_INDEX. A mask of None trains every next token (packed pretraining rows). width
    defaults to the longest render minus one, rows to the number of renders (extra rows are padding only).
    """
    width = max(len(ids) for ids, _ in rendered) - 1 if width is None else width
    rows = len(rendered) if rows is None else rows
    inputs = torch.full((rows, width), pad_id, dtype=torch.long)
    targets = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        ids = torch.tensor(ids, dtype=torch.long)
        inputs[row, :len(ids) - 1] = ids[:-1]
        if mask is None:
            targets[row, :len(ids) - 1] = ids[1:]
        else:
            targets[row, :len(ids) - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), ids[1:], IGNORE_INDEX)
    return inputs.to(device), targets.to(device)


def collate_right(id_lists, device="cpu", pad_id=0):
    """Right-padded ids (B, T) and each row's last real position (B,), as the reward model reads them."""
    if min(len(ids) for ids in id_lists) == 0:
        raise ValueError("cannot score an empty token list")
    ids, valid = pad_right(id_lists, pad_id)
    return ids.to(device), (valid.sum(1) - 1).to(device)
