"""
Loaders: documents and conversations (from nanochat/data.py) to the (inputs, targets) batches of the training
loops. Its own module because batching is about positions, ranks and resume state, not about where text comes from.

  PackedLoader  pretraining rows of seq_len + 1 tokens, each starting at a document's BOS (see the class).
  SFTLoader     one rendered conversation per row, loss only on the tokens the chat template marks as trained.

Both build the whole global batch on every rank and keep the rank's slice, so a 2-process run sees exactly the
global batch of a 1-process run; both are endless with a per-epoch reshuffle for training and a single ordered
pass for evaluation; both resume exactly from a small `state_dict()`. Both turn their rows into tensors with
nanochat/batching.py's `collate_targets`, so targets follow one rule: the next token, or IGNORE_INDEX.
"""

import numpy as np

from nanochat.batching import collate_targets


class _EpochCursor:
    """
    Walks items in epochs: a fresh seeded permutation per epoch when training, the given order once otherwise.
    Its whole state is (epoch, pos), the number of items taken in the current epoch.
    """

    def __init__(self, num_items, train, seed, what):
        if num_items == 0:
            raise ValueError(f"no {what} to load")
        self.num_items, self.train, self.seed = num_items, train, seed
        self.epoch, self.pos = 0, 0
        self._order = (None, None)  # (epoch, permutation): recomputing it per take is O(num_items)

    def order(self):
        if not self.train:
            return np.arange(self.num_items)
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items))
        return self._order[1]

    def take(self, n):
        """Indices of the next up to n items of this epoch (moving to the next epoch first if this one is done)."""
        if self.pos == self.num_items and self.train:
            self.epoch, self.pos = self.epoch + 1, 0
        return self.order()[self.pos:self.pos + n].tolist()

    def advance(self, n=1):
        self.pos += n


def _check_shards(batch_rows, rank, world_size):
    if batch_rows % world_size:
        raise ValueError(f"the global batch ({batch_rows} rows) must divide evenly over {world_size} ranks")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return batch_rows // world_size


class _CursorLoader:
    """The resume state of a loader that walks its items with an _EpochCursor (self.cursor): (epoch, pos)."""

    def state_dict(self):
        return {"epoch": self.cursor.epoch, "pos": self.cursor.pos}

    def load_state_dict(self, state):
        self.cursor.epoch, self.cursor.pos = int(state["epoch"]), int(state["pos"])


class PackedLoader(_CursorLoader):
    """
    Pretraining batches: documents tokenized as [BOS] + tokens and packed into rows of seq_len + 1 tokens.

    Every row starts at a document's BOS and takes whole documents in order; the document that reaches the end of
    the row is cropped there and its remainder is dropped, and the next row starts at the next document. Dropping
    the remainder (instead of carrying it over) means the model always sees a document from its start, and that a
    row boundary is always a document boundary, which makes the resume state just (epoch, document position).
    So a document longer than a row is always cut, at the end of the row it starts in.

    Yields (inputs, targets), LongTensors of shape (batch_rows // world_size, seq_len); rank r gets rows
    [r * B_local, (r + 1) * B_local) of each global batch. train=True: endless, documents reshuffled each epoch
    (seeded by (seed, epoch)), a row may span two epochs. train=False: one pass in the given order; the last
    global batch is completed with rows of BOS inputs and IGNORE_INDEX targets, so every rank gets the same shape.
    """

    def __init__(self, documents, tok, batch_rows, seq_len, rank=0, world_size=1, train=True, seed=0,
                 tokenize_chunk=256, encode=None):
        self.local_rows = _check_shards(batch_rows, rank, world_size)
        self.documents, self.tok = documents, tok
        # documents -> token lists, each starting with BOS; mid-training passes rendered conversations instead
        self.encode = encode or (lambda docs: tok.encode(docs, prepend=tok.bos_token_id))
        self.batch_rows, self.seq_len, self.rank = batch_rows, seq_len, rank
        self.tokenize_chunk = tokenize_chunk
        self.cursor = _EpochCursor(len(documents), train, seed, "documents")

    def __iter__(self):
        bos = self.tok.bos_token_id
        row_len = self.seq_len + 1
        pending = []  # tokenized documents at cursor positions pos, pos + 1, ...: tokenizing in chunks is faster
        while True:
            rows = []
            while len(rows) < self.batch_rows:
                row = []
                while len(row) < row_len:
                    if not pending:
                        docs = [self.documents[i] for i in self.cursor.take(self.tokenize_chunk)]
                        pending = self.encode(docs)[::-1] if docs else []
                        if not pending:
                            break  # end of the single evaluation pass
                    row.extend(pending.pop()[:row_len - len(row)])
                    self.cursor.advance()
                if not row:
                    break
                rows.append(row)
            if not rows:
                return
            start = self.rank * self.local_rows
            inputs, targets = collate_targets([(row, None) for row in rows[start:start + self.local_rows]],
                                              pad_id=bos, width=self.seq_len, rows=self.local_rows)
            state = self.state_dict()
            yield inputs, targets
            if len(rows) < self.batch_rows or len(rows[-1]) < row_len:
                return
            if self.state_dict() != state:  # load_state_dict moved the cursor: what was read ahead is stale
                pending = []


class SFTLoader(_CursorLoader):
    """
    Chat fine-tuning batches: one conversation per row, rendered by tok.render_conversation with at most
    max_len + 1 tokens. targets[t] = ids[t + 1] where the render mask of token t + 1 is 1, else IGNORE_INDEX, so
    only the assistant tokens the template trains are learned. Rows are right-padded to the longest row of the
    global batch (inputs with BOS, targets with IGNORE_INDEX), which gives every rank the same shape.

    `step_rows` (training: the conversations of one optimizer step, a multiple of batch_size) are read together
    and sorted by length before they are cut into global batches: each pads to its own longest row. The step's
    loss, normalised over all its supervised tokens, is the same however its rows are grouped (float rounding
    aside); the padding is not: on the workflow SFT data, micro-batches of 16 random rows were 6,114 tokens wide
    against 2,969 real ones.

    Sharding, epochs, the padded last evaluation batch and state_dict/load_state_dict work as in PackedLoader,
    with batch_size conversations per global batch. A conversation whose assistant turns were all cut off by
    max_len still takes its row, with no supervised token; it adds nothing to a loss normalised by the number of
    supervised tokens, and keeping it keeps every batch at batch_size conversations.
    """

    def __init__(self, conversations, tok, batch_size, max_len, rank=0, world_size=1, train=True, seed=0,
                 step_rows=None):
        self.local_rows = _check_shards(batch_size, rank, world_size)
        self.conversations, self.tok = conversations, tok
        self.batch_size, self.max_len, self.rank = batch_size, max_len, rank
        self.step_rows = step_rows or batch_size
        if self.step_rows % batch_size:
            raise ValueError(f"step_rows={self.step_rows} is not a multiple of batch_size={batch_size}")
        self.cursor = _EpochCursor(len(conversations), train, seed, "conversations")

    def __iter__(self):
        bos = self.tok.bos_token_id
        while True:
            indices = []
            while len(indices) < self.step_rows:
                taken = self.cursor.take(self.step_rows - len(indices))
                if not taken:
                    break  # end of the single evaluation pass
                indices += taken
                self.cursor.advance(len(taken))
            if not indices:
                return
            rendered = [self.tok.render_conversation(self.conversations[i], max_tokens=self.max_len + 1)
                        for i in indices]
            if self.step_rows > self.batch_size:  # stable: every rank sorts the same way
                rendered.sort(key=lambda render: len(render[0]))
            for b0 in range(0, len(rendered), self.batch_size):
                batch = rendered[b0:b0 + self.batch_size]
                width = max(len(ids) for ids, _ in batch) - 1  # the global batch's, so every rank has one shape
                start = self.rank * self.local_rows
                yield collate_targets(batch[start:start + self.local_rows], pad_id=bos, width=width,
                                      rows=self.local_rows)
            if len(indices) < self.step_rows:
                return
