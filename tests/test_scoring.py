"""Reward-model scoring: one convention for (prompt, response, finished) in every stage that scores."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.compare import proxy_scores
from pipeline.config import CompareConfig, DataConfig, PPOAlgoConfig, PPOConfig, RewardSourceConfig
from pipeline.data.records import PreferencePair
from pipeline.data.tokenize import collate_pairs, tokenize_pair
from pipeline.errors import InputError
from pipeline.evaluation import Scored
from pipeline.launch import init_distributed
from pipeline.models import ScalarHead, last_scores, train_tokenizer
from pipeline.ppo import RolloutPrompt, Scorer
from pipeline.reward import score_pairs
from pipeline.scoring import load_reward_model

PROMPT = "the acting in this film"
CUT = " is a little too careful and the score never quite"  # cut at the sampling limit: no EOS
WHOLE = " is wonderful."


def ppo_scorer(reward_folder, tokenizer, normalize=False) -> Scorer:
    cfg = PPOConfig(
        reward=RewardSourceConfig(models=[str(reward_folder)], normalize=normalize),
        data=DataConfig(max_length=96, max_prompt_length=16),
        ppo=PPOAlgoConfig(micro_batch_size=4),
    )
    return Scorer(cfg, tokenizer, init_distributed())


def test_a_truncated_pair_scores_the_same_in_the_reward_stage_ppo_and_compare(tiny_folders, tiny_tokenizer):
    folder = tiny_folders("rm", reward=True)
    pair = PreferencePair(PROMPT, WHOLE, CUT, "row-1", chosen_finished=True, rejected_finished=False)
    data = DataConfig(max_length=64, max_prompt_length=16)
    tokenized = tokenize_pair(tiny_tokenizer, pair, data)
    eos = tiny_tokenizer.eos_token_id
    assert (
        tokenized.chosen.input_ids[-1] == eos and tokenized.rejected.input_ids[-1] != eos
    )  # EOS only where it finished

    head = ScalarHead(AutoModelForSequenceClassification.from_pretrained(folder)).eval()
    with torch.no_grad():
        trained_chosen, trained_rejected = score_pairs(head, collate_pairs([tokenized], tiny_tokenizer.pad_token_id))

    scores, _ = ppo_scorer(folder, tiny_tokenizer)([RolloutPrompt(PROMPT, [], False)] * 2, [WHOLE, CUT], [True, False])
    assert scores.tolist() == pytest.approx([float(trained_chosen), float(trained_rejected)], abs=1e-5)

    proxy = load_reward_model(folder, "float32", init_distributed())
    seen = proxy_scores(proxy, Scored([PROMPT, PROMPT], [WHOLE, CUT], [0.0, 0.0], [], [True, False]), CompareConfig())
    assert seen == pytest.approx(scores.tolist(), abs=1e-5)
    # Finished or cut is visible to the reward model: the same text scores differently with EOS.
    again, _ = ppo_scorer(folder, tiny_tokenizer)([RolloutPrompt(PROMPT, [], False)] * 2, [CUT, CUT], [True, False])
    assert abs(float(again[0] - again[1])) > 1e-4


def test_a_pad_token_equal_to_eos_still_scores_the_final_eos(tiny_folders, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # hub GPT-2 and Llama tokenizers: pad falls back to EOS
    folder = tiny_folders("rm-pad-eos", reward=True, tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.pad_token_id == model.config.eos_token_id
    text = [tokenizer.bos_token_id] + tokenizer(PROMPT + WHOLE, add_special_tokens=False)["input_ids"]
    finished = torch.tensor([text + [tokenizer.eos_token_id]])
    mask = torch.ones_like(finished)
    with torch.no_grad():
        per_position = ScalarHead(model)(finished, mask)  # (1, T)
        ours = last_scores(per_position, mask)
        theirs = model(input_ids=finished, attention_mask=mask).logits.squeeze(-1)
    assert float(ours) == pytest.approx(float(per_position[0, -1]))  # scored at the EOS itself
    # transformers' own pooling takes "the last token that is not pad", i.e. the one before EOS.
    assert float(theirs) == pytest.approx(float(per_position[0, -2]), abs=1e-5)
    assert abs(float(ours) - float(theirs)) > 1e-4
    scores, _ = ppo_scorer(folder, tokenizer)([RolloutPrompt(PROMPT, [], False)] * 2, [WHOLE, WHOLE], [True, False])
    assert abs(float(scores[0] - scores[1])) > 1e-4  # finished and cut told apart


@pytest.mark.parametrize("vocab", [300, 600])
def test_a_reward_model_with_another_tokenizer_reads_the_rollout_text(tiny_folders, tiny_tokenizer, vocab):
    from pipeline.data.builtin_sentiment import load_rows

    other = train_tokenizer([row["review"] for row in load_rows("train", 500)], vocab_size=vocab)
    folder = tiny_folders(f"rm-{vocab}", reward=True, tokenizer=other)
    scorer = ppo_scorer(folder, tiny_tokenizer)
    assert scorer.retokenized == [True]
    texts = [" this movie was great.", " the plot drags"]
    scores, _ = scorer([RolloutPrompt(PROMPT, [], False)] * 2, texts, [True, False])
    # The reward model saw the text in its own tokens: the same as scoring with its own tokenizer.
    own = ppo_scorer(folder, other)
    expected, _ = own([RolloutPrompt(PROMPT, [], False)] * 2, texts, [True, False])
    assert scores.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_a_causal_lm_or_a_reward_model_without_statistics_is_refused(tiny_folders, tiny_tokenizer):
    policy = tiny_folders("policy")
    with pytest.raises(InputError, match="is not a reward model"):
        load_reward_model(policy, "float32", init_distributed())
    folder = tiny_folders("rm-no-stats", reward=True)
    config = (folder / "config.json").read_text().replace('"reward_mean"', '"unused_mean"')
    (folder / "config.json").write_text(config)
    with pytest.raises(InputError, match="reward.normalize: false"):
        ppo_scorer(folder, tiny_tokenizer, normalize=True)
    assert ppo_scorer(folder, tiny_tokenizer, normalize=False).models  # raw scores are allowed


def test_a_damaged_reward_model_is_named_in_one_line(tiny_folders):
    folder = tiny_folders("rm-damaged", reward=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        InputError, match=r"model\.safetensors is damaged or incomplete .*re-run the stage that wrote it"
    ):
        load_reward_model(folder, "float32", init_distributed())
