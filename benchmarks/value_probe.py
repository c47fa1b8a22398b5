"""`python -m benchmarks.value_probe [configs/ppo.yaml]`: how much of PPO's return a value function
could read off each trunk before training starts.

`value_model: shared` puts a linear head on the policy's last hidden states; a value model of its own
starts from the reward model (`ppo.value_model`'s default). Whatever either learns, a linear head on
a trunk can explain no more of the return than the best one fitted by least squares. This script
samples rollouts from the config's policy as PPO's first iteration does, scores them with its
reward (normalised as the config says), and fits that best head on each trunk's hidden states over
the rollouts of the training prompts; it reports the explained variance (`val/explained_variance`'s
formula) on rollouts of the held-out prompts, over all response tokens and by thirds of the response.
At the first iteration the policy is its reference, so the KL penalty is 0 and every response
token's return (gamma 1, GAE's lambda 1) is the sequence's score. The last row is the value model
as it starts, unfitted: the reward model's own head at every position (its scale fitted affinely).
`--mlp` adds a nonlinear head (one hidden layer) on each trunk, for what a linear one might miss.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification

from pipeline.advantages import explained_variance
from pipeline.config import PPOConfig
from pipeline.config.loading import load_config
from pipeline.data.loading import load_prompts
from pipeline.data.records import DropLedger
from pipeline.data.tokenize import encode_prompt
from pipeline.launch import init_distributed
from pipeline.models import ScalarHead, disable_dropout, from_pretrained, load_causal_lm, load_tokenizer
from pipeline.ppo import RolloutPrompt, Scorer
from pipeline.sampling import sample
from pipeline.stage_common import chat_renderer, tokenize_records

THIRDS = ("first third", "middle third", "last third")


@dataclass
class Rollouts:
    """Response tokens of several rollouts, flattened: one row per token whose return is predicted."""

    policy_hidden: torch.Tensor  # (N, H) the policy's last hidden state at the position before the token
    value_hidden: torch.Tensor  # (N, H') the value model's, at the same position
    value_scores: torch.Tensor  # (N,) the value model's own head there
    returns: torch.Tensor  # (N,) the token's return
    third: torch.Tensor  # (N,) 0, 1, 2: where in its response the token lies


def ridge_fit(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares weights (H + 1,) of a linear head with a bias: (N, H), (N,) -> (H + 1,).

    The ridge term is relative to the Gram matrix's mean diagonal (the features' mean square times the
    number of rows), so it means the same at any scale and any number of rows."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    gram = x.T @ x
    scale = gram.diagonal()[:-1].mean().clamp(min=1e-12)
    penalty = torch.eye(x.shape[1], dtype=torch.float64) * ridge * scale
    penalty[-1, -1] = 0.0  # the bias is free
    return torch.linalg.solve(gram + penalty, x.T @ targets.double())


def predict(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return (features.double() @ weights[:-1] + weights[-1]).float()


def held_out_ev(train_x, train_y, test_x, test_y, test_mask, ridge: float = 1e-3) -> float:
    """Explained variance on (test_x, test_y) where test_mask holds, of the head fitted on the training rows."""
    weights = ridge_fit(train_x, train_y, ridge)
    return explained_variance(
        predict(weights, test_x)[test_mask], test_y[test_mask], torch.ones_like(test_y[test_mask])
    )


@torch.no_grad()
def rollouts(
    policy, value_model, tokenizer, scorer, prompts: list[RolloutPrompt], cfg: PPOConfig, seed: int
) -> Rollouts:
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, len(prompts), cfg.ppo.rollout_batch_size):
        batch = prompts[start : start + cfg.ppo.rollout_batch_size]
        out = sample(policy, tokenizer, [p.ids for p in batch], cfg.rollout, generator)
        texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        scores, _ = scorer(batch, texts, out.finished)
        for prompt, response, score in zip(batch, out.sequences, scores.tolist()):
            if not response:
                continue
            ids = torch.tensor([prompt.ids + response])
            # the value at position p predicts the return of token p + 1 (PPO's values[:, :-1])
            positions = torch.arange(len(prompt.ids) - 1, ids.shape[1] - 1)
            policy_hidden = policy(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, positions]
            value_hidden = value_model.model.base_model(input_ids=ids).last_hidden_state[0, positions]
            value_scores = value_model(ids, torch.ones_like(ids))[0, positions]
            third = torch.div(torch.arange(len(positions)) * 3, len(positions), rounding_mode="floor")
            parts.append((policy_hidden, value_hidden, value_scores, torch.full((len(positions),), score), third))
    if not parts:
        raise SystemExit("value_probe: every response was empty")
    return Rollouts(*(torch.cat(column) for column in zip(*parts)))


def mlp_predictions(train_x, train_y, test_x, epochs: int = 40, width: int = 256, seed: int = 0) -> torch.Tensor:
    """A one-hidden-layer GELU head fitted by AdamW to standardised features; its predictions on test_x."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], width), torch.nn.GELU(), torch.nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    with torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(len(train_x), generator=generator).split(256):
                loss = (head(train_x[rows]).squeeze(-1) - train_y[rows]).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        return head(test_x).squeeze(-1)


def report(train: Rollouts, test: Rollouts, mlp: bool = False) -> list[tuple[str, list[float]]]:
    """(row name, held-out explained variance over all response tokens and each third)."""
    masks = [torch.ones_like(test.third, dtype=torch.bool)] + [test.third == i for i in range(3)]
    rows = []
    for name, train_x, test_x in (
        ("policy trunk, best linear head (value_model: shared)", train.policy_hidden, test.policy_hidden),
        ("value model's trunk, best linear head", train.value_hidden, test.value_hidden),
        ("value model as it starts (its head, affine)", train.value_scores[:, None], test.value_scores[:, None]),
    ):
        rows.append((name, [held_out_ev(train_x, train.returns, test_x, test.returns, m) for m in masks]))
    if mlp:
        for name, train_x, test_x in (
            ("policy trunk, an MLP head", train.policy_hidden, test.policy_hidden),
            ("value model's trunk, an MLP head", train.value_hidden, test.value_hidden),
        ):
            predicted = mlp_predictions(train_x, train.returns, test_x)
            rows.append(
                (
                    name,
                    [explained_variance(predicted[m], test.returns[m], torch.ones_like(predicted[m])) for m in masks],
                )
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/ppo.yaml", help="a PPO stage config")
    parser.add_argument("--set", action="append", default=[], help="override a key, as `rlhfdpo ppo --set`")
    parser.add_argument("--prompts", type=int, default=256, help="rollouts to fit on, and as many held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp", action="store_true", help="also fit a one-hidden-layer head (256 wide) on each trunk")
    args = parser.parse_args(argv)

    cfg = load_config(PPOConfig, args.config, args.set)
    torch.manual_seed(args.seed)
    dist = init_distributed()
    tokenizer = load_tokenizer(cfg.model)
    ledger = DropLedger(strict=False)
    train_records, eval_records = load_prompts(cfg.data, ledger, chat_renderer(tokenizer))

    def encoded(records) -> list[RolloutPrompt]:
        distinct = list({r.prompt: r for r in records}.values())
        random.Random(args.seed).shuffle(distinct)
        return tokenize_records(
            distinct[: args.prompts],
            lambda r: RolloutPrompt(r.prompt, encode_prompt(tokenizer, r.prompt, cfg.data), r.unsafe, r.messages),
            ledger,
            "probe prompts",
        )

    fit_prompts, held_out_prompts = encoded(train_records), encoded(eval_records or train_records[::-1])
    # with value_model: shared, the model a value model of its own would start from
    value_source = (
        dataclasses.replace(cfg, value_model=None).value_model_path if cfg.shared_value_head else cfg.value_model_path
    )
    policy = disable_dropout(load_causal_lm(cfg.model)).eval()
    value_model = ScalarHead(
        from_pretrained(
            AutoModelForSequenceClassification,
            value_source,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            dtype=torch.float32,
        )
    )
    disable_dropout(value_model).eval()
    scorer = Scorer(cfg, tokenizer, dist)
    train = rollouts(policy, value_model, tokenizer, scorer, fit_prompts, cfg, args.seed)
    test = rollouts(policy, value_model, tokenizer, scorer, held_out_prompts, cfg, args.seed + 1)

    print(
        f"{len(fit_prompts)} rollouts to fit on ({len(train.returns)} response tokens), {len(held_out_prompts)} held out "
        f"({len(test.returns)}); policy {cfg.model.name_or_path}, value model from {value_source}"
    )
    if cfg.reference_path != cfg.model.name_or_path:
        print(
            f"note: the reference ({cfg.reference_path}) is not the policy, so PPO's return would also carry a KL "
            "penalty; the target here is the score alone"
        )
    print()
    print("| held-out explained variance of the return | all response tokens | " + " | ".join(THIRDS) + " |")
    print("|---|---:|---:|---:|---:|")
    for name, values in report(train, test, args.mlp):
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
