"""Mean gold reward of policies on held-out built-in prompts, each against the first, with intervals.

    python scripts/gold_eval.py runs/sft/model runs/dpo/model runs/ppo/model --prompts 500

Every policy continues the same held-out prompts (disjoint from the training prompts) with the same
sampling settings; the difference to the first policy is paired by prompt and gets a paired
bootstrap 95% interval. KL(pi_T || pi_first,T) is the mean over prompts of the summed log-ratio of
each policy's own samples, both models scored at the sampling temperature T (none at T = 0).
"""

from __future__ import annotations

import argparse

from pipeline.config import DataConfig, ModelConfig, SampleConfig
from pipeline.data.builtin_sentiment import heldout_prompts
from pipeline.evaluation import kl_to_anchor, paired_bootstrap, sample_and_score
from pipeline.judges import gold_reward
from pipeline.models import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="save_pretrained folders; the first is the baseline")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompts = heldout_prompts(args.prompts, seed=args.seed)
    sample = SampleConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    data = DataConfig(max_length=256, max_prompt_length=64)
    gold = gold_reward("vader")
    baseline = args.models[0]
    reference = load_causal_lm(ModelConfig(name_or_path=baseline))
    print(f"{len(prompts)} held-out prompts, temperature {args.temperature}, seed {args.seed}")
    print(f"| policy | mean gold reward | difference to {baseline} (95% CI) | KL to {baseline} |")
    print("| --- | --- | --- | --- |")
    baseline_gold = None
    for path in args.models:
        model = load_causal_lm(ModelConfig(name_or_path=path))  # a merged or a LoRA adapter folder
        tokenizer = load_tokenizer(ModelConfig(name_or_path=path))
        scored = sample_and_score(model, tokenizer, prompts, gold, sample, data, seed=args.seed)
        kl = "-"  # a greedy sequence is not a sample: no KL
        if args.temperature > 0:
            per_prompt = kl_to_anchor(model, reference, scored.sequences, tokenizer.pad_token_id, args.temperature)
            kl = f"{sum(per_prompt) / len(per_prompt):.2f}"
        if baseline_gold is None:
            baseline_gold = scored.gold
            print(f"| {path} | {scored.mean:+.3f} | | {kl} |")
            continue
        diff, low, high = paired_bootstrap(scored.gold, baseline_gold, seed=args.seed)
        print(f"| {path} | {scored.mean:+.3f} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] | {kl} |")


if __name__ == "__main__":
    main()
