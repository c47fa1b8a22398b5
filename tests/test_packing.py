"""Padding-free SFT (`train.packing`): sequences packed into rows, each seeing only itself, give the
padded batch's log-probs, gradients and loss curve."""

from __future__ import annotations

import pytest
import torch

from helpers import StubTokenizer, read_metrics, run_cli, run_ok, sets, tiny_sft_config, write_yaml
from pipeline.config import ArchitectureConfig
from pipeline.data.tokenize import IGNORE, TokenizedExample, collate
from pipeline.logprobs import response_token_logps
from pipeline.models import create_scratch_model
from pipeline.packing import PAD, block_causal_mask, pack, packing_in

EXAMPLES = [
    TokenizedExample([11, 12, 13, 14, 15, 16, 17, 18], 3),  # the widest: a row of its own
    TokenizedExample([21, 22, 23, 24, 25], 2),
    TokenizedExample([31, 32, 33], 1),  # fits beside the five-token one
    TokenizedExample([41, 42, 43, 44], 4),  # nothing trained: adds nothing either way
    TokenizedExample([51, 52, 53, 54, 55, 56], 2, trained=(False, False, True, True, False, True)),
]


def test_sequences_pack_longest_first_into_rows_no_wider_than_the_longest_with_positions_restarting():
    batch = pack(EXAMPLES, pad_id=0)
    # Lengths 8, 6, 5, 4, 3 first-fit into width 8: [8], [6], [5 + 3], [4]: four rows for five.
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 14, 15, 16, 17, 18]
    assert batch["input_ids"][1].tolist() == [51, 52, 53, 54, 55, 56, 0, 0]
    assert batch["sequence"][1].tolist() == [4] * 6 + [PAD] * 2
    assert batch["input_ids"][2].tolist() == [21, 22, 23, 24, 25, 31, 32, 33]
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["sequence"][2].tolist() == [1] * 5 + [2] * 3
    assert batch["input_ids"][3].tolist() == [41, 42, 43, 44, 0, 0, 0, 0]
    # A packed sequence's first token is predicted by nothing, as in a row of its own.
    assert batch["labels"][2].tolist() == [IGNORE, IGNORE, 23, 24, 25, IGNORE, 32, 33]
    assert batch["labels"][1].tolist() == [IGNORE, IGNORE, 53, 54, IGNORE, 56, IGNORE, IGNORE]


def test_a_token_sees_the_earlier_tokens_of_its_own_sequence_only():
    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=16), StubTokenizer(), 0)
    batch = pack(EXAMPLES[:3], pad_id=0)  # rows [8], [5 + 3]
    mask = block_causal_mask(batch["sequence"], model)[1, 0]  # (W, W), True: attends
    assert mask[5].tolist() == [False] * 5 + [True, False, False]  # the second sequence's first token
    assert mask[4].tolist() == [True] * 5 + [False] * 3
    assert mask.diagonal().all()


def padded_and_packed(model, examples):
    padded = collate(examples, pad_id=0)
    logps, mask = response_token_logps(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    packed = pack(examples, pad_id=0)
    packed_logps, packed_mask = response_token_logps(
        model,
        packed["input_ids"],
        block_causal_mask(packed["sequence"], model),
        packed["labels"],
        position_ids=packed["position_ids"],
    )
    return (logps.sum(), mask.sum()), (packed_logps.sum(), packed_mask.sum())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_batchs_log_probs_and_gradients(kind, attention):
    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=64)
    model = create_scratch_model(arch, StubTokenizer(), seed=3)
    model.config._attn_implementation = attention
    model.train(False)
    (padded, tokens), (packed, packed_tokens) = padded_and_packed(model, EXAMPLES)
    assert int(tokens) == int(packed_tokens) == 5 + 3 + 2 + 0 + 3  # every trained token, once
    assert padded.item() < -1.0
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)

    def gradients(use_packed: bool):
        model.zero_grad()
        pair = padded_and_packed(model, EXAMPLES)
        pair[1 if use_packed else 0][0].backward()
        return [p.grad.clone() for p in model.parameters()]

    for e, g in zip(gradients(False), gradients(True)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_a_model_that_takes_no_mask_of_ours_pads_instead_and_says_so(capsys):
    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=16), StubTokenizer(), 0)

    class Main:
        is_main = True

    assert packing_in(model, True, Main()) is True and packing_in(model, False, Main()) is False
    model.config._attn_implementation = "flash_attention_2"
    assert packing_in(model, True, Main()) is False
    assert "padded rows instead" in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.slow
def test_sft_with_packing_follows_the_padded_loss_curve(tmp_path):
    padded = tmp_path / "padded"
    run_ok("sft", str(write_yaml(tmp_path / "sft.yaml", tiny_sft_config(padded))))
    packed = tmp_path / "packed"
    run_ok("sft", str(tmp_path / "sft.yaml"), *sets(f"output_dir={packed}", "train.packing=true"))
    curve = lambda run: [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]  # noqa: E731
    expected, got = curve(padded), curve(packed)
    assert [s for s, _ in got] == [s for s, _ in expected] and len(got) > 1
    for (_, loss), (_, loss_e) in zip(got, expected):
        assert loss == pytest.approx(loss_e, abs=1e-4)
    held_out = lambda run: [m["eval/loss"] for m in read_metrics(run) if "eval/loss" in m]  # noqa: E731
    assert len(held_out(packed)) == len(held_out(padded)) > 1
    assert held_out(packed) == pytest.approx(held_out(padded), abs=1e-4)


@pytest.mark.parametrize("stage, config", [("dpo", "configs/dpo.yaml"), ("reward", "configs/reward.yaml")])
def test_packing_on_a_pair_stage_is_one_line_naming_share_prompt(stage, config):
    result = run_cli(stage, config, *sets("train.packing=true"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.packing: only sft packs sequences" in result.stderr and "train.share_prompt" in result.stderr
