"""The run folder: what a run refuses, keeps, checks and recovers, in process."""

from __future__ import annotations

import errno
import os

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline.config import SFTConfig, TrainConfig, to_dict
from pipeline.errors import InputError, RunFailed
from pipeline.launch import init_distributed, save_pretrained
from pipeline.runs import RunDir, Trainable, check_resume_config, checkpoint_problem, prepare_output_dir


def fake_checkpoint(folder, step: int, config=None) -> None:
    """A checkpoint folder as save_checkpoint writes it, with a 2-tensor "model"."""
    path = folder / "checkpoints" / f"step-{step}"
    (path / "model").mkdir(parents=True)
    (path / "model" / "config.json").write_text("{}")
    save_file({"w": torch.ones(4) * step}, str(path / "model" / "model.safetensors"))
    torch.save({"step": step, "optimizers": {}, "ranks": [{"rng": torch.get_rng_state()}]}, path / "trainer_state.pt")
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))


# --------------------------------------------------------------------------- fresh runs, overwrite


def test_a_fresh_run_refuses_a_folder_that_holds_anything(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    with pytest.raises(InputError, match=r"already holds README.md; pass --resume .* or --overwrite"):
        RunDir(tmp_path, init_distributed())
    assert (tmp_path / "README.md").read_text() == "my notes"
    RunDir(tmp_path / "new", init_distributed())  # a missing or empty folder is fine
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty", init_distributed())


def test_overwrite_removes_what_runs_write_and_nothing_else(tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "my-notes.txt").write_text("keep me")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("config.yaml", "metrics.jsonl", "README.md", "cost.json", "data.jsonl"):
        (tmp_path / name).write_text("x")
    RunDir(tmp_path, init_distributed(), overwrite=True, produces=("tokenizer",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "data.jsonl"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["my-notes.txt"]


def test_what_a_stage_reads_from_its_folder_neither_blocks_a_fresh_run_nor_is_cleared(tmp_path):
    (tmp_path / "evaluations").mkdir()
    (tmp_path / "evaluations" / "kept.json").write_text("{}")
    prepare_output_dir(tmp_path, init_distributed(), False, False, produces=("report.md",), reads=("evaluations",))
    (tmp_path / "report.md").write_text("old")
    with pytest.raises(InputError, match=r"already holds report.md;"):  # the evaluations are not named
        prepare_output_dir(tmp_path, init_distributed(), False, False, produces=("report.md",), reads=("evaluations",))
    prepare_output_dir(tmp_path, init_distributed(), False, True, produces=("report.md",), reads=("evaluations",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluations"]
    assert (tmp_path / "evaluations" / "kept.json").is_file()


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(InputError, match="exclude each other"):
        prepare_output_dir(tmp_path, init_distributed(), resume=True, overwrite=True, produces=())


# --------------------------------------------------------------------------------- checkpoints


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    run = RunDir(tmp_path, init_distributed(), resume=True)
    assert run.latest_checkpoint().name == "step-30"
    weights = tmp_path / "checkpoints" / "step-30" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    state = tmp_path / "checkpoints" / "step-20" / "trainer_state.pt"
    state.write_bytes(os.urandom(300))  # random
    assert "damaged or incomplete" in checkpoint_problem(tmp_path / "checkpoints" / "step-30")
    assert "damaged" in checkpoint_problem(tmp_path / "checkpoints" / "step-20")
    assert run.latest_checkpoint().name == "step-10"
    assert "skipping checkpoint" in capsys.readouterr().err


def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path):
    fake_checkpoint(tmp_path, 5)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(
        {"step": 5, "optimizers": {}, "rng": Payload()}, tmp_path / "checkpoints" / "step-5" / "trainer_state.pt"
    )
    run = RunDir(tmp_path, init_distributed(), resume=True)
    with pytest.raises(InputError, match="cannot be loaded as a checkpoint"):
        run.load_trainer_state(tmp_path / "checkpoints" / "step-5", [])
    assert not marker.exists()


def trained_model(folder):
    """A tiny causal LM after one AdamW step, so its optimizer has state to save."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    return model, optimizer


def test_a_genuine_trainer_state_loads_with_weights_only(tmp_path, tiny_folders):
    model, optimizer = trained_model(tiny_folders("policy"))
    tmp_path = tmp_path / "run"
    run = RunDir(tmp_path, init_distributed())
    cfg = SFTConfig()
    generator = torch.Generator().manual_seed(3)
    run.save_checkpoint(
        1, [Trainable("model", model, optimizer)], {"kl_coef": 0.25, "generator": generator.get_state()}, 2, cfg
    )
    expected_draw = torch.rand(3, generator=generator)
    state = run.load_trainer_state(tmp_path / "checkpoints" / "step-1", [Trainable("model", model, optimizer)])
    assert state["step"] == 1 and state["kl_coef"] == 0.25
    generator.set_state(state["generator"])
    assert torch.equal(torch.rand(3, generator=generator), expected_draw)
    assert (tmp_path / "checkpoints" / "step-1" / "config.yaml").is_file()


def test_a_full_disk_keeps_the_earlier_checkpoint_and_says_so(tmp_path, tiny_folders, monkeypatch):
    model, optimizer = trained_model(tiny_folders("policy"))
    tmp_path = tmp_path / "run"
    run = RunDir(tmp_path, init_distributed())
    cfg = SFTConfig()
    run.save_checkpoint(10, [Trainable("model", model, optimizer)], {}, 2, cfg)
    before = (tmp_path / "checkpoints" / "step-10" / "trainer_state.pt").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunFailed, match=r"cannot write checkpoint .*step-20: .*No space left.*step-10\) are kept"):
        run.save_checkpoint(20, [Trainable("model", model, optimizer)], {}, 2, cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10"]  # no half-written folder
    assert (tmp_path / "checkpoints" / "step-10" / "trainer_state.pt").read_bytes() == before


def test_non_finite_weights_are_never_saved(tmp_path, tiny_folders):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folders("policy"))
    target = tmp_path / "model"
    save_pretrained(model, None, target, init_distributed())
    saved = (target / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(RunFailed, match="non-finite weights"):
        save_pretrained(model, None, target, init_distributed())
    assert (target / "model.safetensors").read_bytes() == saved  # the earlier save stays whole


# ------------------------------------------------------------------------------ resume with a config


def test_resume_refuses_changes_to_the_model_data_or_batches_and_allows_the_rest(tmp_path):
    cfg = SFTConfig()
    fake_checkpoint(tmp_path, 10, cfg)
    checkpoint = tmp_path / "checkpoints" / "step-10"
    assert check_resume_config(cfg, checkpoint, tmp_path) == []
    for key, change in (
        ("model.architecture.n_layer", lambda c: setattr(c.model.architecture, "n_layer", 2)),
        ("train.batch_size", lambda c: setattr(c.train, "batch_size", 64)),
        ("train.seed", lambda c: setattr(c.train, "seed", 1)),
        ("data.train.0.path", lambda c: setattr(c.data.train[0], "path", "other.jsonl")),
    ):
        changed = SFTConfig()
        change(changed)
        with pytest.raises(InputError, match=rf"--resume: the config differs .* in {key.replace('.', '[.]')} "):
            check_resume_config(changed, checkpoint, tmp_path)
    harmless = SFTConfig(train=TrainConfig(max_steps=500, log_every=5, eval_every=7))
    notes = check_resume_config(harmless, checkpoint, tmp_path)
    assert sorted(n.split(" ")[0] for n in notes) == ["train.eval_every", "train.log_every", "train.max_steps"]
