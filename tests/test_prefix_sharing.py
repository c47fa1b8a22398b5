"""A pair as one row [prompt, chosen, rejected]: the same log-probs, lengths and gradients as a row per side."""

from __future__ import annotations

import pytest
import torch

from helpers import StubTokenizer
from pipeline.config import ArchitectureConfig
from pipeline.data.tokenize import TokenizedExample, TokenizedPair, collate_pairs
from pipeline.logprobs import response_token_logps
from pipeline.models import create_scratch_model
from pipeline.prefix_sharing import (
    CHOSEN,
    PROMPT,
    REJECTED,
    attention_mask,
    collate_shared_pairs,
    shared_pair_logps,
)


def pair(prompt: list[int], chosen: list[int], rejected: list[int], trained=None) -> TokenizedPair:
    return TokenizedPair(
        TokenizedExample(prompt + chosen, len(prompt)), TokenizedExample(prompt + rejected, len(prompt))
    )


PAIRS = [
    pair([11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36]),  # rejected the longer
    pair([16, 17], [24, 25, 26, 27, 28, 29, 30], [37]),  # a one-token rejected side
    pair([18, 19, 20, 40, 41, 42, 43, 44], [45, 46], [47, 48, 49]),  # the prompt most of the row
]


def unshared(model, pairs, temperature=1.0):
    batch = collate_pairs(pairs, pad_id=0)
    logps, mask = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], temperature)
    half = len(pairs)
    sums, lengths = logps.sum(-1), mask.sum(-1)
    return sums[:half], sums[half:], lengths[:half], lengths[half:]


def test_one_row_holds_the_prompt_once_with_positions_restarting_and_each_token_predicted_from_its_own_side():
    batch = collate_shared_pairs(PAIRS[:1], pad_id=0)
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10]
    assert batch["segments"][0].tolist() == [PROMPT] * 5 + [CHOSEN] * 3 + [REJECTED] * 6
    # The rejected side's first token (position 8) is predicted by the prompt's last (4), not by the chosen side's end.
    assert batch["predictor"][0, 5:].tolist() == [4, 5, 6, 4, 8, 9, 10, 11, 12]
    assert batch["labels"][0, :5].eq(-100).all() and batch["labels"][0, 5:].tolist() == [
        21,
        22,
        23,
        31,
        32,
        33,
        34,
        35,
        36,
    ]


def test_the_rejected_side_never_sees_the_chosen_side_and_padding_counts_no_token():
    batch = collate_shared_pairs(PAIRS[:2], pad_id=0)  # the second row: 10 tokens, then 4 of padding
    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=16), StubTokenizer(), 0)
    mask = attention_mask(batch["segments"], model)[1, 0]  # (T, T), True: attends
    rejected = 2 + 7  # after a 2-token prompt and the 7-token chosen side
    assert mask[rejected, :2].all() and not mask[rejected, 2:rejected].any() and mask[rejected, rejected]
    assert mask[5, :6].all() and not mask[5, 6:].any()  # a chosen token: causal over prompt and chosen
    assert mask[-1].tolist() == [True] + [False] * 13  # padding sees the first position only
    assert mask.diagonal().sum() == 10  # what the cost meter counts as tokens


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_log_probs_lengths_and_gradients_equal_a_row_per_side(kind, attention):
    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=64)
    model = create_scratch_model(arch, StubTokenizer(), seed=2)
    model.config._attn_implementation = attention
    model.train(False)
    for temperature in (1.0, 0.7):
        expected = unshared(model, PAIRS, temperature)
        got = shared_pair_logps(model, collate_shared_pairs(PAIRS, pad_id=0), temperature)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)

    def gradients(loss_of):
        model.zero_grad()
        pc, pr, _, _ = loss_of()
        (pc - 2 * pr).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for e, g in zip(
        gradients(lambda: unshared(model, PAIRS)),
        gradients(lambda: shared_pair_logps(model, collate_shared_pairs(PAIRS, pad_id=0))),
    ):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_pairs_whose_sides_begin_differently_cannot_share_a_prompt():
    odd = TokenizedPair(TokenizedExample([1, 2, 3], 2), TokenizedExample([1, 9, 3], 2))
    with pytest.raises(ValueError, match="different prompt tokens"):
        collate_shared_pairs([odd], pad_id=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_rewards_and_gradients_equal_a_row_per_side(kind, attention):
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import ScalarHead, scratch_config
    from pipeline.prefix_sharing import shared_pair_scores
    from pipeline.reward import score_pairs

    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_embd=32, n_positions=64)
    torch.manual_seed(4)
    config = scratch_config(arch, StubTokenizer())
    config.num_labels = 1
    head = ScalarHead(AutoModelForSequenceClassification.from_config(config))
    head.config._attn_implementation = attention
    head.train(False)
    # A side with no response token at all is read at the prompt's last position, both ways.
    pairs = [*PAIRS, pair([50, 51, 52], [53, 54], [])]

    def rewards(shared: bool):
        head.zero_grad()
        batch = collate_shared_pairs(pairs, 0) if shared else collate_pairs(pairs, 0)
        chosen, rejected = shared_pair_scores(head, batch) if shared else score_pairs(head, batch)
        (chosen - 3 * rejected).sum().backward()
        return chosen.detach(), rejected.detach(), [p.grad.clone() for p in head.parameters()]

    (ec, er, egrads), (gc, gr, ggrads) = rewards(False), rewards(True)
    torch.testing.assert_close(gc, ec, rtol=0, atol=1e-5)
    torch.testing.assert_close(gr, er, rtol=0, atol=1e-5)
    for e, g in zip(egrads, ggrads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_share_prompt_belongs_to_the_pair_stages_and_other_attention_falls_back_with_a_warning(capsys):
    from pipeline.config import ConfigError, PPOConfig, SFTConfig, TrainConfig
    from pipeline.launch import Dist
    from pipeline.prefix_sharing import share_prompt_in

    for stage in (SFTConfig, PPOConfig):
        with pytest.raises(ConfigError, match="train.share_prompt: only the pair stages"):
            stage(train=TrainConfig(share_prompt=True)).check()
    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=16), StubTokenizer(), 0)
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launched=False)
    assert share_prompt_in(model, True, dist) and not share_prompt_in(model, False, dist)
    model.config._attn_implementation = "flash_attention_2"
    assert not share_prompt_in(model, True, dist)
    assert "train.share_prompt needs a gpt2/llama/qwen2/qwen3/mistral model" in capsys.readouterr().err


def test_a_sliding_window_or_an_unlisted_family_does_not_share():
    from transformers import MistralConfig, MistralForCausalLM

    from pipeline.prefix_sharing import shares_prefixes

    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert shares_prefixes(MistralForCausalLM(MistralConfig(**shape, sliding_window=None)))
    assert not shares_prefixes(MistralForCausalLM(MistralConfig(**shape, sliding_window=4)))
    llama = create_scratch_model(ArchitectureConfig(type="llama", n_layer=1, n_head=2, n_embd=16), StubTokenizer(), 0)
    llama.config.model_type = "bloom"  # ALiBi from a 2D mask: a 4D one would lose it
    assert not shares_prefixes(llama)


def test_share_prompt_in_an_sft_config_is_one_line_on_the_command_line():
    from helpers import ROOT, run_cli, sets

    result = run_cli("sft", "configs/sft.yaml", *sets("train.share_prompt=true"), cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.share_prompt: only the pair stages (dpo, reward) share a prompt; sft has none" in result.stderr
