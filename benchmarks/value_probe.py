"""`python -m benchmarks.value_probe [configs/ppo.yaml]`: how much of PPO's return a value function
could read off each trunk before training starts.

`value_model: shared` puts a linear head on the policy's last hidden states; a value model of its own
starts from the reward model (`ppo.value_model`'s default). On the rows it is fitted to, no linear
head on a trunk explains more of the return than the least-squares one. This script samples
rollouts from the config's policy as PPO's first iteration does, scores them with its reward
(normalised as the config says), fits a least-squares head (with a small ridge) on each trunk's
hidden states over the rollouts of training prompts, and reports the explained variance
(`val/explained_variance`'s formula) on the rollouts of held-out prompts (none of them a fitted
prompt), over all response tokens and by thirds of the response. The target is the Monte Carlo
return, what GAE's lambda 1 trains a critic towards (lambda < 1 mixes in the critic's own values):
at the first iteration the policy is its reference, so the KL penalty is 0 and a response token's
return is the sequence's score, discounted by ppo.gamma for each token after it. The last row is
the value model as it starts, unfitted: the reward model's own head at every position (its scale
fitted affinely). `--mlp` adds a nonlinear head (one hidden layer) on each trunk, for what a linear
one might miss.
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
from pipeline.errors import ConfigError, InputError
from pipeline.launch import init_distributed
from pipeline.models import ScalarHead, disable_dropout, from_pretrained, load_causal_lm, load_tokenizer
from pipeline.ppo import RolloutPrompt, Scorer, check_value_tokenizer
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
    lengths: list[int]  # each kept rollout's response length: its rows are consecutive, in order


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


def explained_variance_where(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    return explained_variance(predicted[mask], targets[mask], torch.ones_like(targets[mask]))


def held_out_explained_variance(train_x, train_y, test_x, test_y, test_mask, ridge: float = 1e-3) -> float:
    """Explained variance on (test_x, test_y) where test_mask holds, of the head fitted on the training rows."""
    return explained_variance_where(predict(ridge_fit(train_x, train_y, ridge), test_x), test_y, test_mask)


@torch.no_grad()
def rollouts(
    policy, value_model, tokenizer, scorer, prompts: list[RolloutPrompt], cfg: PPOConfig, seed: int
) -> Rollouts:
    """Sampled, scored rollouts of `prompts`; `value_model` is a ScalarHead, `scorer` a pipeline.ppo.Scorer."""
    generator = torch.Generator().manual_seed(seed)
    parts, lengths = [], []
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
            value_scores = value_model.model.score(value_hidden.float()).squeeze(-1)
            # the reward comes after the last token: token j of L is L - 1 - j steps before it
            returns = score * cfg.ppo.gamma ** torch.arange(len(response) - 1, -1, -1, dtype=torch.float64)
            third = torch.div(torch.arange(len(positions)) * 3, len(positions), rounding_mode="floor")
            parts.append((policy_hidden, value_hidden, value_scores, returns.float(), third))
            lengths.append(len(response))
    if not parts:
        raise SystemExit("value_probe: every response was empty")
    return Rollouts(*(torch.cat(column) for column in zip(*parts)), lengths)


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


def report(train: Rollouts, test: Rollouts, mlp: bool = False, seed: int = 0) -> list[tuple[str, list[float]]]:
    """(row name, held-out explained variance over all response tokens and each third)."""
    masks = [torch.ones_like(test.third, dtype=torch.bool)] + [test.third == i for i in range(3)]
    linear = (
        ("policy trunk, best linear head (value_model: shared)", train.policy_hidden, test.policy_hidden),
        ("value model's trunk, best linear head", train.value_hidden, test.value_hidden),
        ("value model as it starts (its head, affine)", train.value_scores[:, None], test.value_scores[:, None]),
    )
    predictions = [(name, predict(ridge_fit(x, train.returns), test_x)) for name, x, test_x in linear]
    if mlp:
        predictions += [
            (
                "policy trunk, an MLP head",
                mlp_predictions(train.policy_hidden, train.returns, test.policy_hidden, seed=seed),
            ),
            (
                "value model's trunk, an MLP head",
                mlp_predictions(train.value_hidden, train.returns, test.value_hidden, seed=seed),
            ),
        ]
    return [(name, [explained_variance_where(p, test.returns, m) for m in masks]) for name, p in predictions]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/ppo.yaml", help="a PPO stage config")
    parser.add_argument("--set", action="append", default=[], help="override a key, as `rlhfdpo ppo --set`")
    parser.add_argument("--prompts", type=int, default=256, help="rollouts to fit on, and as many held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp", action="store_true", help="also fit a one-hidden-layer head (256 wide) on each trunk")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(PPOConfig, args.config, args.set)
    except ConfigError as err:
        raise SystemExit(f"value_probe: {err}") from None
    torch.manual_seed(args.seed)
    dist = init_distributed()
    tokenizer = load_tokenizer(cfg.model)
    ledger = DropLedger(strict=False)
    train_records, eval_records = load_prompts(cfg.data, ledger, chat_renderer(tokenizer))

    def distinct(records) -> list:
        unique = list({r.prompt: r for r in records}.values())
        random.Random(args.seed).shuffle(unique)
        return unique

    def probe_prompts(records) -> list[RolloutPrompt]:
        return tokenize_records(
            records,
            lambda r: RolloutPrompt(r.prompt, encode_prompt(tokenizer, r.prompt, cfg.data), r.unsafe, r.messages),
            ledger,
            "probe prompts",
        )

    fit_records = distinct(train_records)[: args.prompts]
    fitted = {r.prompt for r in fit_records}
    # held out: the eval split's prompts that are not fitted ones, or else the training prompts after the fitted ones
    held_out_records = [r for r in distinct(eval_records or train_records) if r.prompt not in fitted][: args.prompts]
    if not held_out_records:
        raise SystemExit("value_probe: no held-out prompt is left once the fitted ones are set aside")
    fit_prompts, held_out_prompts = probe_prompts(fit_records), probe_prompts(held_out_records)
    # with value_model: shared, the model a value model of its own would start from
    value_source = (
        dataclasses.replace(cfg, value_model=None).value_model_path if cfg.shared_value_head else cfg.value_model_path
    )
    try:
        check_value_tokenizer(value_source, tokenizer)  # a value model reads the policy's token ids
    except InputError as err:
        raise SystemExit(f"value_probe: {err}") from None
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
    for name, values in report(train, test, args.mlp, args.seed):
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
