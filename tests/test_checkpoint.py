"""
Checkpoints: round trip, atomic saves, clear errors, and the guarantees of the stage skeleton's files (a finished
checkpoint only at the end, weights_only loading, the tokenizer tied to the model, resume refusing another run).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_tiny_model
from nanochat import checkpoint as ckpt
from nanochat.checkpoint import (CheckpointError, check_same_tokenizer, load_model, load_resume_state, load_tokenizer,
                                 save_checkpoint, save_resume_state, stage_status)
from nanochat.common import DivergedError


@pytest.fixture
def tok_dir(tmp_path, tok):
    tok.save(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def train_steps(model, optimizers, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 97, (2, 17), generator=g)
        model(idx[:, :-1], idx[:, 1:]).backward()
        for o in optimizers:
            o.step()
        model.zero_grad(set_to_none=True)


def test_round_trip_reproduces_outputs_exactly_from_any_working_directory(tmp_path, tiny_model, tok_dir,
                                                                          monkeypatch):
    save_checkpoint(tmp_path / "sft", tiny_model, step=5, tokenizer_dir=tok_dir, flags={"lr": 0.1})
    idx = torch.randint(0, 97, (3, 11))
    monkeypatch.chdir("/")  # catches: the tokenizer found by a path relative to where the stage ran
    for path in (tmp_path / "sft", tmp_path / "sft" / "ckpt.pt"):  # by directory or by file
        loaded, payload = load_model(path)
        assert torch.equal(loaded(idx), tiny_model(idx))
        assert payload["step"] == 5 and payload["flags"] == {"lr": 0.1}
        assert load_tokenizer(payload).encode("Zavu likes red") == load_tokenizer(payload).encode("Zavu likes red")
    meta = (tmp_path / "sft" / "meta.json").read_text()
    assert '"step": 5' in meta and '"n_layer": 2' in meta and '"complete": true' in meta


def test_a_checkpoint_saved_with_relative_paths_loads_after_a_cd(tmp_path, tiny_model, tok, monkeypatch):
    # catches: the tokenizer looked up relative to the cwd of the load call, not to the checkpoint's directory
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    tok.save("outs/tokenizer")
    save_checkpoint("outs/sft", tiny_model, step=1, tokenizer_dir="outs/tokenizer")
    _, loaded_before_cd = load_model("outs/sft")
    monkeypatch.chdir(tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "run" / "outs" / "tokenizer")  # only the copy beside the checkpoint is left
    _, loaded_after_cd = load_model("../run/outs/sft")
    for payload in (loaded_before_cd, loaded_after_cd):
        assert load_tokenizer(payload).encode("Zavu likes red") == tok.encode("Zavu likes red")
    assert loaded_before_cd["path"] == os.path.join("outs", "sft", "ckpt.pt")  # reports keep the path as typed


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, tiny_model, tok_dir, monkeypatch):
    out = tmp_path / "base"
    save_checkpoint(out, tiny_model, step=1, tokenizer_dir=tok_dir)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, tiny_model, step=2, tokenizer_dir=tok_dir)
    monkeypatch.undo()
    loaded, payload = load_model(out)
    assert payload["step"] == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    assert sorted(os.listdir(out)) == ["ckpt.pt", "meta.json", "tokenizer"]  # no temp file left behind


def test_missing_truncated_and_mismatched_checkpoints_name_the_path(tmp_path, tiny_model, tok_dir):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope" / "ckpt.pt")):
        load_model(tmp_path / "nope")
    save_checkpoint(tmp_path / "a", tiny_model, step=0, tokenizer_dir=tok_dir)
    file = tmp_path / "a" / "ckpt.pt"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(file)
    assert str(file) in str(e.value)
    save_checkpoint(tmp_path / "b", tiny_model, step=0, tokenizer_dir=tok_dir)
    payload = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    payload["config"]["n_layer"] = 3  # a config that does not fit the saved weights
    torch.save(payload, tmp_path / "b" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="does not match the model") as e:
        load_model(tmp_path / "b")
    assert str(tmp_path / "b" / "ckpt.pt") in str(e.value)


def test_a_directory_with_an_interrupted_run_is_refused_even_beside_an_older_finished_model(tmp_path, tiny_model,
                                                                                           tok_dir):
    # catches: a later stage loading a half-trained model, or the older ckpt.pt while a newer run is unfinished
    out = tmp_path / "base"
    opts = tiny_model.setup_optimizers()
    save_resume_state(out, tiny_model, 5, opts, identity={"stage": "x"})
    assert stage_status(out) == "partial"
    with pytest.raises(CheckpointError, match="unfinished run"):
        load_model(out)
    os.remove(out / "optim.pt")
    save_checkpoint(out, tiny_model, step=30, tokenizer_dir=tok_dir)
    assert stage_status(out) == "complete"
    save_resume_state(out, tiny_model, 5, opts, identity={"stage": "x"})
    with pytest.raises(CheckpointError, match="--resume=True"):
        load_model(out)


def test_opening_a_crafted_checkpoint_runs_no_code(tmp_path):
    # catches: torch.load(weights_only=False), which unpickles arbitrary objects (and runs their __reduce__)
    marker = tmp_path / "pwned"
    crafted = tmp_path / "evil"
    crafted.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil(), "config": {}}, crafted / "ckpt.pt")
    with pytest.raises(CheckpointError, match="refusing to open"):
        load_model(crafted)
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", f"--ckpt_path={crafted}", "--prompt=hi"],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and "refusing to open" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_a_swapped_tokenizer_and_two_different_tokenizers_are_refused(tmp_path, tiny_model, tok_dir, world):
    # catches: running a model on the ids of a retrained tokenizer (exit 0 today, or an IndexError)
    from nanochat.tokenizer import train_tokenizer
    save_checkpoint(tmp_path / "a", tiny_model, step=0, tokenizer_dir=tok_dir)
    other = train_tokenizer(world.pretrain_documents(200, seed=5), 290)
    other.save(tmp_path / "other_tok")
    save_checkpoint(tmp_path / "b", tiny_model, step=0, tokenizer_dir=tmp_path / "other_tok")
    _, a = load_model(tmp_path / "a")
    _, b = load_model(tmp_path / "b")
    with pytest.raises(CheckpointError, match="different tokenizers") as e:
        check_same_tokenizer(a, b)
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "b") in str(e.value)
    other.save(tmp_path / "a" / "tokenizer")  # someone replaces the copy that travels with the model
    with pytest.raises(CheckpointError, match="is not the one"):
        load_tokenizer(a)


def test_a_non_finite_model_is_never_saved(tmp_path, tiny_model, tok_dir):
    # catches: a NaN learning rate whose weights get written as the stage's result
    with torch.no_grad():
        tiny_model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(DivergedError, match="step 7: weight lm_head.weight"):
        save_checkpoint(tmp_path / "nan", tiny_model, step=7, tokenizer_dir=tok_dir)
    with pytest.raises(DivergedError):
        save_resume_state(tmp_path / "nan", tiny_model, 7, [], identity={})
    assert not (tmp_path / "nan" / "ckpt.pt").exists() and not (tmp_path / "nan" / "optim.pt").exists()


def test_resume_state_continues_exactly_and_loads_weights_only(tmp_path):
    model = make_tiny_model(randomize=False)
    opts = model.setup_optimizers(matrix_optimizer="muon")
    train_steps(model, opts, 3, seed=0)
    identity = {"stage": "base_train", "flags": {"seq_len": 64}}
    save_resume_state(tmp_path / "run", model, 3, opts, identity, extra_state={"loader": {"epoch": 0, "pos": 12}})
    torch.load(tmp_path / "run" / "optim.pt", weights_only=True)  # catches: numpy arrays or objects in the state
    torch.manual_seed(123)
    train_steps(model, opts, 3, seed=1)
    reference = model.state_dict()
    after = torch.rand(3)

    fresh = make_tiny_model(seed=99, randomize=False)
    fresh_opts = fresh.setup_optimizers(matrix_optimizer="muon")
    torch.manual_seed(5)
    step, extra = load_resume_state(tmp_path / "run", fresh, fresh_opts, identity)
    assert step == 3 and extra == {"loader": {"epoch": 0, "pos": 12}}
    torch.manual_seed(123)
    train_steps(fresh, fresh_opts, 3, seed=1)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())
    assert torch.equal(torch.rand(3), after)


def test_resume_of_another_run_is_refused_naming_the_difference(tmp_path, tiny_model):
    # catches: continuing a state with a changed --seq_len, or another stage's state, as if it were this run's
    opts = tiny_model.setup_optimizers()
    save_resume_state(tmp_path / "run", tiny_model, 4, opts, {"stage": "base_train", "flags": {"seq_len": 64}})
    with pytest.raises(CheckpointError, match=r"flags.seq_len: 64 -> 128"):
        load_resume_state(tmp_path / "run", tiny_model, opts, {"stage": "base_train", "flags": {"seq_len": 128}})
    with pytest.raises(CheckpointError, match=r"stage: 'base_train' -> 'kat_train_rm'"):
        load_resume_state(tmp_path / "run", tiny_model, opts, {"stage": "kat_train_rm", "flags": {"seq_len": 64}})
    assert load_resume_state(tmp_path / "empty", tiny_model, opts, {}) == (0, None)
    assert ckpt.resolve_path(tmp_path / "run") == str(tmp_path / "run" / "ckpt.pt")
