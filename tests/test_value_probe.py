"""benchmarks.value_probe: the best linear value head on a trunk, fitted by least squares."""

from __future__ import annotations

import pytest
import torch
import yaml

from benchmarks.value_probe import held_out_ev, main, ridge_fit


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
    assert held_out_ev(x[:2000], y[:2000], x[2000:], y[2000:], everywhere) == pytest.approx(expected, abs=0.02)
    # features unrelated to the target explain nothing on held-out rows (what fits the training rows is noise)
    assert abs(held_out_ev(x[:2000], noise[:2000], x[2000:], noise[2000:], everywhere)) < 0.02
    # the mask picks the rows scored
    half = torch.arange(2000) < 1000
    assert held_out_ev(x[:2000], y[:2000], x[2000:], y[2000:], half) == pytest.approx(
        held_out_ev(x[:2000], y[:2000], x[2000:3000], y[2000:3000], torch.ones(1000, dtype=torch.bool))
    )


def test_the_probe_fits_both_trunks_on_rollouts_and_reports_held_out_rows(tiny_folders, tmp_path, capsys):
    # The tiny reward model's trunk is the policy's own (tiny_folders copies it), so the best linear
    # head on either trunk is the same head, fitted to the same rows: the two rows must agree.
    policy, reward = tiny_folders("policy"), tiny_folders("rm", reward=True)
    config = {
        "output_dir": str(tmp_path / "unused"),
        "model": {"name_or_path": str(policy)},
        "reward": {"kind": "model", "models": [str(reward)], "normalize": True},
        "data": {
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
    main([str(path), "--prompts", "24", "--mlp"])
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
    for line in rows.values():
        if "explained variance" in line:
            continue
        for cell in line.strip("| \n").split(" | ")[1:]:
            assert float(cell) <= 1.0
