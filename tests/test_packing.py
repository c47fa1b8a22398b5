"""Padding-free SFT (`train.packing`): a micro-batch's sequences end to end in one row, each seeing
only itself, give the padded batch's log-probs, gradients and loss curve."""

from __future__ import annotations

import pytest
import torch

from helpers import StubTokenizer, read_metrics, run_cli, run_ok, sets, tiny_sft_config, write_yaml
from pipeline.config import ArchitectureConfig
from pipeline.data.tokenize import IGNORE, TokenizedExample, collate
from pipeline.logprobs import response_token_logps
from pipeline.models import create_scratch_model
from pipeline.packing import ATTENTION, MAX_CUTS, buckets_by_length, layout_of, pack, packed_forward, packing_in
from pipeline.training import checkpoint_activations

EXAMPLES = [
    TokenizedExample([11, 12, 13, 14, 15, 16, 17, 18], 3),  # the longest
    TokenizedExample([21, 22, 23, 24, 25], 2),
    TokenizedExample([31, 32, 33], 1),
    TokenizedExample([41, 42, 43, 44], 4),  # nothing trained: adds nothing either way
    TokenizedExample([51, 52, 53, 54, 55, 56], 2, trained=(False, False, True, True, False, True)),
]


def test_sequences_pack_end_to_end_in_one_row_with_positions_restarting():
    batch = pack(EXAMPLES[1:3] + EXAMPLES[4:], pad_id=0)
    assert {name: tuple(t.shape) for name, t in batch.items()} == {
        name: (1, 5 + 3 + 6) for name in ("input_ids", "position_ids", "sequence", "labels")
    }
    assert batch["input_ids"][0].tolist() == [21, 22, 23, 24, 25, 31, 32, 33, 51, 52, 53, 54, 55, 56]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert batch["sequence"][0].tolist() == [0] * 5 + [1] * 3 + [2] * 6
    # A packed sequence's first token is predicted by nothing, as in a row of its own.
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, 23, 24, 25, IGNORE, 32, 33] + [
        IGNORE,
        IGNORE,
        53,
        54,
        IGNORE,
        56,
    ]


def test_sequences_share_a_padded_bucket_where_one_more_attention_call_costs_more_than_the_padding():
    assert buckets_by_length([8, 5, 3], call_cost=1e9) == [[2, 1, 0]]  # calls dear: one bucket
    assert buckets_by_length([8, 5, 3], call_cost=0) == [[2], [1], [0]]  # free: each alone
    # 4 short and 1 long: the short ones together (4 x 10^2 + 1 call), the long one alone.
    assert buckets_by_length([10, 10, 100, 9, 10], call_cost=500) == [[3, 0, 1, 4], [2]]
    # The 9 alone saves 100 - 81 = 19 pairs: worth a call that costs 18, not one that costs 20.
    assert buckets_by_length([10, 10, 9], call_cost=20) == [[2, 0, 1]]
    assert buckets_by_length([10, 10, 9], call_cost=18) == [[2], [0, 1]]


def test_a_micro_batch_of_many_sequences_cuts_its_buckets_at_most_max_cuts_places():
    lengths = [(7 * i) % 90 + 1 for i in range(300)]
    buckets = buckets_by_length(lengths, call_cost=0)  # free calls: a bucket at every place it may cut
    assert MAX_CUTS == 64 and len(buckets) == 300 // 5  # every 5th sequence: ceil(300 / 64) = 5
    assert sorted(i for bucket in buckets for i in bucket) == list(range(300))
    flat = [lengths[i] for bucket in buckets for i in bucket]
    assert flat == sorted(flat)


def test_each_position_has_a_slot_of_its_own_in_its_buckets_padded_row():
    batch = pack([EXAMPLES[2], EXAMPLES[0], EXAMPLES[1]], pad_id=0)  # 3, 8 and 5 tokens
    layout = layout_of(batch["sequence"], batch["position_ids"], call_cost=30, copy_cost=0)
    # [3, 5] padded to 5 and the 8 alone: 2 x 25 + 64 + 2 calls of 30 = 174 pairs, less than one
    # bucket's 3 x 64 + 30 = 222 or a bucket each's 9 + 25 + 64 + 90 = 188.
    assert layout.buckets == ((2, 5), (1, 8))
    assert layout.slots.tolist() == [0, 1, 2] + list(range(10, 18)) + [5, 6, 7, 8, 9]
    assert layout.lengths == (3, 8, 5)
    assert layout_of(batch["sequence"], batch["position_ids"], call_cost=1e9, copy_cost=0).buckets == ((3, 8),)


def test_each_sequence_is_attended_where_it_lies_when_copying_into_buckets_costs_more_than_its_calls():
    batch = pack([EXAMPLES[2], EXAMPLES[0], EXAMPLES[1]], pad_id=0)  # 3, 8 and 5 tokens
    # A call each costs 188 pairs; the buckets 174 and their copies 16 positions x copy_cost.
    own = layout_of(batch["sequence"], batch["position_ids"], call_cost=30, copy_cost=0.875)  # 188 either way
    assert own.slots is None and own.buckets == ((1, 3), (1, 8), (1, 5)) and own.lengths == (3, 8, 5)
    bucketed = layout_of(batch["sequence"], batch["position_ids"], call_cost=30, copy_cost=0.8)  # 186.8
    assert bucketed.buckets == ((2, 5), (1, 8)) and bucketed.slots is not None
    # By default, sequences of the bench's lengths attend in place; many short ones share buckets.
    long_ones = pack([TokenizedExample(list(range(n)), 1) for n in (98, 135, 142, 155, 164, 168, 184, 195)], 0)
    assert layout_of(long_ones["sequence"], long_ones["position_ids"]).slots is None
    short_ones = pack([TokenizedExample(list(range(4 + i % 9)), 1) for i in range(256)], 0)
    assert layout_of(short_ones["sequence"], short_ones["position_ids"]).slots is not None


def padded_and_packed(model, examples, costs):
    padded = collate(examples, pad_id=0)
    logps, mask = response_token_logps(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    packed = pack(examples, pad_id=0)
    with packed_forward(model, packed, *costs) as layout:
        packed_logps, packed_mask = response_token_logps(
            model, packed["input_ids"], None, packed["labels"], forward_kwargs=layout
        )
    return (logps.sum(), mask.sum()), (packed_logps.sum(), packed_mask.sum())


def packed_model(kind: str, attention: str, kv_heads: int | None = None):
    arch = ArchitectureConfig(
        type=kind, n_layer=2, n_head=4, n_kv_head=kv_heads, n_embd=32, n_positions=64, vocab_size=64
    )
    model = create_scratch_model(arch, StubTokenizer(), seed=3)
    model.config._attn_implementation = attention
    model.train(False)
    return model


def gradients(model, examples, packed: bool, costs: tuple[float, float] = (0, 0)):
    """Parameter gradients of the summed log-prob, padded or packed; packed, the backward runs
    where the sft loop runs it, inside packed_forward."""
    model.zero_grad()
    if not packed:
        batch = collate(examples, pad_id=0)
        response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].sum().backward()
    else:
        batch = pack(examples, pad_id=0)
        with packed_forward(model, batch, *costs) as layout:
            logps, _ = response_token_logps(model, batch["input_ids"], None, batch["labels"], forward_kwargs=layout)
            logps.sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "kind, kv_heads", [("gpt2", None), ("llama", None), ("llama", 2)], ids=["gpt2", "llama", "llama-gqa"]
)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
# (call_cost, copy_cost): a call per sequence, in place; buckets [4, 3], [6, 5] and [8]; one bucket.
@pytest.mark.parametrize("costs", [(0, 60), (30, 0), (1e9, 60)], ids=["in-place", "buckets", "one-bucket"])
def test_packed_rows_give_the_padded_batchs_log_probs_and_gradients(kind, kv_heads, attention, costs):
    model = packed_model(kind, attention, kv_heads)
    (padded, tokens), (packed, packed_tokens) = padded_and_packed(model, EXAMPLES, costs)
    assert int(tokens) == int(packed_tokens) == 5 + 3 + 2 + 0 + 3  # every trained token, once
    assert padded.item() < -1.0
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert model.config._attn_implementation == attention  # restored after the packed forward
    for e, g in zip(gradients(model, EXAMPLES, False), gradients(model, EXAMPLES, True, costs)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("costs", [(0, 0), (30, 0)], ids=["in-place", "buckets"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_activation_checkpointing_recomputes_the_packed_attention(kind, costs):
    # The recomputation runs in the backward: outside packed_forward it would attend across sequences.
    model = packed_model(kind, "sdpa")
    expected = gradients(model, EXAMPLES, False)
    model.train(True)  # checkpointing acts in training mode only; these models have no dropout
    checkpoint_activations(model, True)
    for e, g in zip(expected, gradients(model, EXAMPLES, True, costs)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_the_packed_attention_refuses_a_forward_without_its_layout():
    model = packed_model("gpt2", "sdpa")
    batch = collate(EXAMPLES, pad_id=0)
    model.config._attn_implementation = ATTENTION
    with pytest.raises(RuntimeError, match="packed rows only"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


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
