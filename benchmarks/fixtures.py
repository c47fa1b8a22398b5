"""The shared inputs of every benchmark run: synthetic text, one tokenizer, two model sizes.

Rows are random pseudo-words (3,000 of them, about 2.2 BPE tokens each with a 4,096-token
vocabulary) with word counts drawn from fixed ranges, so every framework sees the same length
distribution. The token counts that throughput is measured in are computed here, once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = {  # GPT-2 shapes; parameter counts include the tied 4096-token embedding
    "3M": {"n_embd": 192, "n_layer": 6, "n_head": 6},
    "25M": {"n_embd": 512, "n_layer": 8, "n_head": 8},
    # For a GPU: GPT-2 small's and medium's blocks (124M and 355M with GPT-2's own 50k vocabulary).
    "89M": {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "308M": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
}
VOCAB_SIZE = 4096
N_POSITIONS = 1024
PROMPT_WORDS = (8, 32)
RESPONSE_WORDS = (8, 64)
MAX_LENGTH = 256  # prompt + response + EOS always fit
# Pairs shaped like HH-RLHF: a dialogue of two or three human turns with the assistant's replies
# between them as the prompt, about two thirds of each side's tokens.
HH_TURNS = (2, 3)
HH_PROMPT_WORDS = (48, 96)  # over all of the prompt's turns
HH_RESPONSE_WORDS = (20, 52)
HH_MAX_LENGTH = 640  # every prompt (at most 310 tokens with the bench's tokenizer) and response fits
HH_MAX_PROMPT_LENGTH = 480


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 8))))
    return sorted(words)


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " " + " ".join(rng.choice(words) for _ in range(n))


def pair_rows(n: int, seed: int, prompt_words=PROMPT_WORDS, response_words=RESPONSE_WORDS) -> list[dict]:
    """n {prompt, chosen, rejected} rows; lengths uniform in the given word-count ranges."""
    rng = random.Random(seed)
    words = _words(random.Random(0), 3000)
    return [
        {
            "prompt": _sentence(rng, words, rng.randint(*prompt_words)),
            "chosen": _sentence(rng, words, rng.randint(*response_words)),
            "rejected": _sentence(rng, words, rng.randint(*response_words)),
        }
        for _ in range(n)
    ]


def hh_pair_rows(n: int, seed: int) -> list[dict]:
    """n {prompt, chosen, rejected} rows shaped like HH-RLHF: the prompt a multi-turn dialogue in
    HH's own Human:/Assistant: form, ending at the assistant's turn."""
    rng = random.Random(seed)
    words = _words(random.Random(0), 3000)
    rows = []
    for _ in range(n):
        turns = 2 * rng.randint(*HH_TURNS) - 1  # human, assistant, ..., human
        budget = rng.randint(*HH_PROMPT_WORDS)
        lengths = [max(1, budget // turns + rng.randint(-3, 3)) for _ in range(turns)]
        prompt = "".join(
            f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}:{_sentence(rng, words, k)}" for i, k in enumerate(lengths)
        )
        rows.append(
            {
                "prompt": prompt + "\n\nAssistant:",
                "chosen": _sentence(rng, words, rng.randint(*HH_RESPONSE_WORDS)),
                "rejected": _sentence(rng, words, rng.randint(*HH_RESPONSE_WORDS)),
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build(root: Path, n_rows: int = 4096, seed: int = 0, sizes: dict[str, dict] | None = None) -> dict:
    """Data files, the tokenizer and one initial model per size under `root`; returns their paths."""
    from transformers import GPT2ForSequenceClassification

    from pipeline.config import ArchitectureConfig
    from pipeline.models import create_scratch_model, train_tokenizer

    rows = pair_rows(n_rows, seed)
    pairs = write_jsonl(rows, root / "data" / "pairs.jsonl")
    sft = write_jsonl([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows], root / "data" / "sft.jsonl")
    eval_rows = pair_rows(32, seed + 1)
    pairs_eval = write_jsonl(eval_rows, root / "data" / "pairs-eval.jsonl")
    sft_eval = write_jsonl(
        [{"prompt": r["prompt"], "completion": r["chosen"]} for r in eval_rows], root / "data" / "sft-eval.jsonl"
    )
    hh_rows = hh_pair_rows(1024, seed + 2)
    pairs_hh = write_jsonl(hh_rows, root / "data" / "pairs-hh.jsonl")
    pairs_hh_eval = write_jsonl(hh_pair_rows(32, seed + 3), root / "data" / "pairs-hh-eval.jsonl")
    tokenizer = train_tokenizer((r[k] for r in rows for k in ("prompt", "chosen", "rejected")), VOCAB_SIZE)
    models, reward_models = {}, {}
    for name, shape in (sizes or SIZES).items():
        arch = ArchitectureConfig(n_positions=N_POSITIONS, vocab_size=VOCAB_SIZE, **shape)
        model = create_scratch_model(arch, tokenizer, seed)
        folder = root / "models" / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        models[name] = str(folder)
        # PPO's reward model: the same backbone with a one-label head, as `rlhfdpo reward` saves it.
        reward = GPT2ForSequenceClassification.from_pretrained(folder, num_labels=1)
        reward.config.pad_token_id = tokenizer.pad_token_id
        reward_folder = root / "reward_models" / name
        reward.save_pretrained(reward_folder)
        tokenizer.save_pretrained(reward_folder)
        reward_models[name] = str(reward_folder)
    tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt = [tokens(r["prompt"]) for r in rows]
    chosen = [tokens(r["chosen"]) for r in rows]
    rejected = [tokens(r["rejected"]) for r in rows]
    hh_prompt = [tokens(r["prompt"]) for r in hh_rows]
    hh_chosen = [tokens(r["chosen"]) for r in hh_rows]
    hh_rejected = [tokens(r["rejected"]) for r in hh_rows]
    meta = {
        "rows": n_rows,
        "data": {
            "pairs": str(pairs),
            "sft": str(sft),
            "pairs_eval": str(pairs_eval),
            "sft_eval": str(sft_eval),
            "pairs_hh": str(pairs_hh),
            "pairs_hh_eval": str(pairs_hh_eval),
        },
        "models": models,
        "reward_models": reward_models,
        # Real (non-padding) tokens per example, EOS included: what throughput is counted in.
        "tokens_per_example": {
            "sft": sum(p + c + 1 for p, c in zip(prompt, chosen)) / n_rows,
            "pair": sum(2 * p + c + r + 2 for p, c, r in zip(prompt, chosen, rejected)) / n_rows,
            "pair_hh": sum(2 * p + c + r + 2 for p, c, r in zip(hh_prompt, hh_chosen, hh_rejected)) / len(hh_rows),
        },
        # The prompts' share of a pair's tokens, row per side: what computing it once saves is half of it
        "prompt_share": {
            "pair": sum(2 * p for p in prompt) / sum(2 * p + c + r + 2 for p, c, r in zip(prompt, chosen, rejected)),
            "pair_hh": sum(2 * p for p in hh_prompt)
            / sum(2 * p + c + r + 2 for p, c, r in zip(hh_prompt, hh_chosen, hh_rejected)),
        },
        "max_tokens": max(p + max(c, r) + 1 for p, c, r in zip(prompt, chosen, rejected)),
        "max_tokens_hh": max(p + max(c, r) + 1 for p, c, r in zip(hh_prompt, hh_chosen, hh_rejected)),
        "max_prompt_tokens_hh": max(hh_prompt),
    }
    (root / "fixtures.json").write_text(json.dumps(meta, indent=2))
    return meta
