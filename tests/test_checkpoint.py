import os

import pytest
import torch

from conftest import make_tiny_model
from nanochat import checkpoint as ckpt
from nanochat.checkpoint import CheckpointError, load_model, load_resume_state, save_checkpoint


def train_steps(model, optimizers, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 97, (2, 17), generator=g)
        model(idx[:, :-1], idx[:, 1:]).backward()
        for o in optimizers:
            o.step()
        model.zero_grad(set_to_none=True)


def test_round_trip_reproduces_outputs_exactly(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "sft", tiny_model, step=5, tokenizer_dir="outs/tokenizer", flags={"lr": 0.1})
    idx = torch.randint(0, 97, (3, 11))
    for path in (tmp_path / "sft", tmp_path / "sft" / "ckpt.pt"):  # by directory or by file
        loaded, payload = load_model(path)
        assert torch.equal(loaded(idx), tiny_model(idx))
        assert payload["step"] == 5 and payload["flags"] == {"lr": 0.1}
    meta = (tmp_path / "sft" / "meta.json").read_text()
    assert '"step": 5' in meta and '"n_layer": 2' in meta


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "base"
    save_checkpoint(out, tiny_model, step=1, tokenizer_dir="tok")
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, tiny_model, step=2, tokenizer_dir="tok")
    monkeypatch.undo()
    loaded, payload = load_model(out)
    assert payload["step"] == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    assert sorted(os.listdir(out)) == ["ckpt.pt", "meta.json"]  # no temp file left behind


def test_missing_truncated_and_mismatched_checkpoints_name_the_path(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope" / "ckpt.pt")):
        load_model(tmp_path / "nope")
    save_checkpoint(tmp_path / "a", tiny_model, step=0, tokenizer_dir="tok")
    file = tmp_path / "a" / "ckpt.pt"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(file)
    assert str(file) in str(e.value)
    save_checkpoint(tmp_path / "b", tiny_model, step=0, tokenizer_dir="tok")
    payload = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    payload["config"]["n_layer"] = 3  # a config that does not fit the saved weights
    torch.save(payload, tmp_path / "b" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="does not match the model") as e:
        load_model(tmp_path / "b")
    assert str(tmp_path / "b" / "ckpt.pt") in str(e.value)


def test_resume_state_continues_exactly(tmp_path):
    model = make_tiny_model(randomize=False)
    opts = model.setup_optimizers()
    train_steps(model, opts, 3, seed=0)
    save_checkpoint(tmp_path / "run", model, step=3, tokenizer_dir="tok", optimizers=opts,
                    extra_state={"loader": 123})
    train_steps(model, opts, 3, seed=1)
    reference = model.state_dict()

    fresh = make_tiny_model(seed=99, randomize=False)
    fresh_opts = fresh.setup_optimizers()
    step, extra = load_resume_state(tmp_path / "run", fresh, fresh_opts)
    assert step == 3 and extra == {"loader": 123}
    train_steps(fresh, fresh_opts, 3, seed=1)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())


def test_resume_without_optimizer_state_is_refused_and_empty_dir_starts_fresh(tmp_path, tiny_model):
    opts = tiny_model.setup_optimizers()
    save_checkpoint(tmp_path / "run", tiny_model, step=4, tokenizer_dir="tok")  # no optimizers given
    with pytest.raises(CheckpointError, match="no optim.pt"):
        load_resume_state(tmp_path / "run", tiny_model, opts)
    assert load_resume_state(tmp_path / "empty", tiny_model, opts) == (0, None)
    assert ckpt.resolve_path(tmp_path / "run") == str(tmp_path / "run" / "ckpt.pt")
