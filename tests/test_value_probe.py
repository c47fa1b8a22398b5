"""benchmarks.value_probe: the best linear value head on a trunk, fitted by least squares."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from benchmarks.value_probe import held_out_explained_variance, main, ridge_fit, rollouts
from pipeline.config import DataConfig, PPOAlgoConfig, PPOConfig, RewardSourceConfig, SampleConfig
from pipeline.data.builtin_sentiment import load_rows
from pipeline.data.tokenize import encode_prompt
from pipeline.models import ScalarHead, train_tokenizer
from pipeline.ppo import RolloutPrompt
from pipeline.sampling import Generation, sample


def test_the_ridge_shrinks_the_weights_and_leaves_the_bias_free():
    # x = -1, 1 and y = 2x + 5: the Gram matrix of [x, 1] is diag(2, 2), so a ridge of 1 adds 1 x 2 to
    # x's entry: w = (x . y) / (2 + 2) = 4 / 4 = 1; the bias, unpenalised, stays the mean of y.
    x, y = torch.tensor([[-1.0], [1.0]]), torch.tensor([3.0, 7.0])
    assert ridge_fit(x, y, ridge=1.0).tolist() == pytest.approx([1.0, 5.0])
    assert ridge_fit(x, y, ridge=0.0).tolist() == pytest.approx([2.0, 5.0])


def test_held_out_explained_variance_is_what_the_features_carry():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=generator)
    weights = torch.randn(8, generator=generator)
    noise = torch.randn(4000, generator=generator)
    y = x @ weights + noise  # explained variance |w|^2 / (|w|^2 + 1) for the true head
    expected = float(weights.square().sum() / (weights.square().sum() + 1))
    everywhere = torch.ones(2000, dtype=torch.bool)
    assert held_out_explained_variance(x[:2000], y[:2000], x[2000:], y[2000:], everywhere) == pytest.approx(
        expected, abs=0.02
    )
    # features unrelated to the target explain nothing on held-out rows (what fits the training rows is noise)
    assert abs(held_out_explained_variance(x[:2000], noise[:2000], x[2000:], noise[2000:], everywhere)) < 0.02
    # the mask picks the rows scored
    half = torch.arange(2000) < 1000
    assert held_out_explained_variance(x[:2000], y[:2000], x[2000:], y[2000:], half) == pytest.approx(
        held_out_explained_variance(x[:2000], y[:2000], x[2000:3000], y[2000:3000], torch.ones(1000, dtype=torch.bool))
    )


def probe_config(tmp_path, policy, reward, data: dict | None = None) -> str:
    config = {
        "output_dir": str(tmp_path / "unused"),
        "model": {"name_or_path": str(policy)},
        "reward": {"kind": "model", "models": [str(reward)], "normalize": True},
        "data": data
        or {
            "train": [{"path": "builtin:sentiment", "format": "reviews", "split": "train"}],
            "eval": [{"path": "builtin:sentiment", "format": "reviews", "split": "test"}],
            "max_length": 48,
            "max_prompt_length": 16,
        },
        "rollout": {"max_new_tokens": 8, "temperature": 1.0},
        "ppo": {"rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_probe_fits_both_trunks_on_rollouts_and_reports_held_out_rows(tiny_folders, tmp_path, capsys):
    # The tiny reward model's trunk is the policy's own (tiny_folders copies it), so the best linear
    # head on either trunk is the same head, fitted to the same rows: the two rows must agree.
    path = probe_config(tmp_path, tiny_folders("policy"), tiny_folders("rm", reward=True))
    main([path, "--prompts", "24", "--mlp"])
    out = capsys.readouterr().out
    assert "24 rollouts to fit on" in out and "24 held out" in out, out
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    policy_row = rows["policy trunk, best linear head (value_model: shared)"].split(" | ")[1:]
    value_row = rows["value model's trunk, best linear head"].split(" | ")[1:]
    assert policy_row == value_row
    assert (
        rows["policy trunk, an MLP head"].split(" | ")[1:] == rows["value model's trunk, an MLP head"].split(" | ")[1:]
    )


def test_each_response_token_gets_its_trunks_states_before_it_and_its_discounted_return(tiny_folders, tiny_tokenizer):
    # The value at position p predicts the return of token p + 1 (PPO's values[:, :-1]), so a response of
    # L tokens after a prompt of P gives L rows, read at positions P - 1 ... P + L - 2. The score comes
    # after the last token: with gamma 0.5, token j of L has the return score x 0.5^(L - 1 - j).
    policy = AutoModelForCausalLM.from_pretrained(tiny_folders("policy")).eval()
    value_model = ScalarHead(AutoModelForSequenceClassification.from_pretrained(tiny_folders("rm", reward=True))).eval()
    cfg = PPOConfig(
        reward=RewardSourceConfig(kind="gold"),
        data=DataConfig(max_length=48, max_prompt_length=16),
        rollout=SampleConfig(max_new_tokens=6, temperature=1.0),
        ppo=PPOAlgoConfig(rollout_batch_size=3, mini_batch_size=3, micro_batch_size=3, gamma=0.5),
    )
    texts = [" ".join(row["review"].split()[:3]) for row in load_rows("train", 6)]
    prompts = [RolloutPrompt(t, encode_prompt(tiny_tokenizer, t, cfg.data)) for t in texts]

    def scorer(batch, responses, finished):  # the i-th rollout of a batch scores i + 1
        return torch.arange(1, len(batch) + 1, dtype=torch.float32), torch.zeros(len(batch))

    got = rollouts(policy, value_model, tiny_tokenizer, scorer, prompts, cfg, seed=3)

    generator = torch.Generator().manual_seed(3)  # the same draws again, to know what was sampled
    expected_rows, row = [], 0
    for start in (0, 3):
        out = sample(policy, tiny_tokenizer, [p.ids for p in prompts[start : start + 3]], cfg.rollout, generator)
        for i, (prompt, response) in enumerate(zip(prompts[start : start + 3], out.sequences)):
            if not response:
                continue
            length, first = len(response), len(prompt.ids) - 1
            ids = torch.tensor([prompt.ids + response])
            with torch.no_grad():
                hidden = policy(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                scores = value_model(ids, torch.ones_like(ids))[0]
            rows = slice(row, row + length)
            assert torch.allclose(got.policy_hidden[rows], hidden[first : first + length], atol=1e-6)
            assert torch.allclose(got.value_scores[rows], scores[first : first + length], atol=1e-6)
            returns = [(i + 1) * 0.5 ** (length - 1 - j) for j in range(length)]
            assert got.returns[rows].tolist() == pytest.approx(returns)
            assert got.third[rows].tolist() == [j * 3 // length for j in range(length)]
            expected_rows.append(length)
            row += length
    assert got.lengths == expected_rows and row == len(got.returns) > 0


def test_a_value_model_with_another_tokenizer_is_refused_in_one_line(tiny_folders, tmp_path):
    other = train_tokenizer([row["review"] for row in load_rows("train", 50)], vocab_size=300)
    path = probe_config(tmp_path, tiny_folders("policy"), tiny_folders("rm", reward=True, tokenizer=other))
    with pytest.raises(SystemExit, match=r"^value_probe: value model .*: its tokenizer is not the policy's"):
        main([path])


def test_no_held_out_prompt_left_is_refused(tiny_folders, tmp_path):
    # three training prompts, no eval split: fitting on all three leaves none to hold out
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"prompt {i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3))
    )
    data = {
        "train": [{"path": str(rows), "format": "prompt_chosen_rejected"}],
        "max_length": 48,
        "max_prompt_length": 16,
    }
    path = probe_config(tmp_path, tiny_folders("policy"), tiny_folders("rm", reward=True), data)
    with pytest.raises(
        SystemExit, match="^value_probe: no held-out prompt is left once the fitted ones are set aside$"
    ):
        main([path, "--prompts", "3"])


def test_rollouts_that_are_all_empty_are_refused(tiny_folders, tiny_tokenizer, monkeypatch):
    import benchmarks.value_probe as probe

    monkeypatch.setattr(
        probe, "sample", lambda model, tok, ids, *rest: Generation([[] for _ in ids], [True] * len(ids))
    )
    policy = AutoModelForCausalLM.from_pretrained(tiny_folders("policy")).eval()
    value_model = ScalarHead(AutoModelForSequenceClassification.from_pretrained(tiny_folders("rm", reward=True)))
    cfg = PPOConfig(reward=RewardSourceConfig(kind="gold"))
    prompts = [RolloutPrompt("a film", encode_prompt(tiny_tokenizer, "a film", cfg.data))]
    with pytest.raises(SystemExit, match="^value_probe: every response was empty$"):
        rollouts(policy, value_model, tiny_tokenizer, lambda *args: (torch.ones(1), torch.zeros(1)), prompts, cfg, 0)


def test_a_bad_config_is_refused_in_one_line_naming_the_key(tiny_folders, tmp_path):
    path = probe_config(tmp_path, tiny_folders("policy"), tiny_folders("rm", reward=True))
    with pytest.raises(SystemExit, match=r"^value_probe: .*ppo.yaml: .*rollout_batch: unknown key.*rollout_batch_size"):
        main([path, "--set", "ppo.rollout_batch=4"])
