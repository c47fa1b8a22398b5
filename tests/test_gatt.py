"""Ghost Attention: the instruction checkers, the built-in chat task, the GAtt builder token by token,
the adherence evaluation on hand-made dialogues, and the chain end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from helpers import ROOT, read_metrics, run_cli, run_ok, sets, write_yaml
from pipeline.adherence import score, summarize, table_lines
from pipeline.config import STAGES, AdherenceConfig, DataConfig, GattConfig, config_from_dict
from pipeline.data.adapters import messages_example
from pipeline.data.builtin_dialogues import INSTRUCTIONS, load_rows
from pipeline.data.records import Drop
from pipeline.data.tokenize import IGNORE, tokenize_sft
from pipeline.dialogues import Rollout, attention_on, generated, message_spans, roll_out
from pipeline.instructions import Combined, Instruction, check_reply, combine, with_instruction
from pipeline.models import render_chat
from pipeline.stage_common import chat_renderer

FAN = Instruction("you are a film fan: always be positive.", "fan: positive.", sentiment="positive")
CRITIC = Instruction("you are a film critic: always be negative.", sentiment="negative")
POPCORN = Instruction("always mention the popcorn.", contains="popcorn")
SHORT = Instruction("answer in at most 5 words.", max_words=5)
PIRATE = Instruction("talk like a pirate.")  # no check: adherence unknown, never guessed


# ----------------------------------------------------------------------------------- checkers


def test_each_check_on_hand_made_replies():
    assert check_reply(FAN, "a wonderful film, i loved it.") == {"sentiment": True}
    assert check_reply(FAN, "a dull, boring mess.") == {"sentiment": False}
    assert check_reply(FAN, "it runs two hours.") == {"sentiment": False}  # neutral is not positive
    assert check_reply(CRITIC, "a dull, boring mess.") == {"sentiment": True}
    assert check_reply(POPCORN, "I ate POPCORN.") == {"contains": True}  # any case
    assert check_reply(POPCORN, "popcorns everywhere") == {"contains": False}  # a whole word
    assert check_reply(SHORT, "one two three four five") == {"max_words": True}
    assert check_reply(SHORT, "one two three four five six") == {"max_words": False}
    assert check_reply(PIRATE, "arr") == {}


def test_combined_instructions_pass_only_when_every_check_passes():
    both = Combined((FAN, POPCORN))
    assert both.text() == "you are a film fan: always be positive. always mention the popcorn."
    assert both.text(short=True) == "fan: positive. always mention the popcorn."  # no short wording: the text
    assert both.follows("great popcorn, a lovely film.") is True
    assert both.follows("a lovely film.") is False
    assert both.check("a lovely film.") == {"sentiment": True, "contains": False}
    assert Combined((PIRATE,)).follows("arr") is None
    assert Combined((PIRATE, SHORT)).follows("arr") is True


def test_combine_draws_between_min_and_max_and_never_two_of_a_kind():
    rng = random.Random(0)
    sizes = set()
    for _ in range(300):
        given = combine(INSTRUCTIONS, rng, 1, 3)
        kinds = [kind for part in given.parts for kind in part.kinds]
        assert len(kinds) == len(set(kinds)), given  # never a fan and a critic, two keywords, two limits
        sizes.add(len(given.parts))
    assert sizes == {1, 2, 3}
    # A group per check, not per instruction: personas come up as often as the four keywords.
    firsts = [combine(INSTRUCTIONS, random.Random(i), 1, 1).parts[0] for i in range(600)]
    personas = sum(p.sentiment is not None for p in firsts)
    keywords = sum(p.contains is not None for p in firsts)
    assert 140 < personas < 260 and 140 < keywords < 260
    assert with_instruction("fan: positive.", "i saw it") == "fan: positive.\ni saw it"


# ------------------------------------------------------------------------------ built-in task


def _instruction_of(text: str) -> Combined | None:
    """The combination an instruction text spells (long or short wording), from the built-in list."""
    found = []
    for instruction in INSTRUCTIONS:
        for wording in (instruction.text, instruction.short):
            if wording in text:
                found.append(instruction)
                break
    return Combined(tuple(found)) if found else None


def test_builtin_sft_dialogues_let_each_instruction_govern_exactly_the_next_reply():
    rows = load_rows("train", 300)
    assert rows[:50] == load_rows("train", 50)  # row i depends on i only
    governed = ungoverned = 0
    for row in rows:
        messages = row["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        assert 2 <= len(turns) <= 6 and [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        for k in range(0, len(turns), 2):
            user, reply = turns[k]["content"], turns[k + 1]["content"]
            own = _instruction_of(user.split("\n")[0]) if "\n" in user else None
            governing = own or (_instruction_of(system) if system and k == 0 else None)
            if governing is not None:
                assert governing.follows(reply), (user, reply)
                governed += 1
            else:
                ungoverned += 1
    assert governed > 150 and ungoverned > 150
    # A system instruction governs the first reply only: later replies of the same dialogue, with no
    # instruction of their own, follow it no more than the corpus does by chance.
    later = []
    for row in rows:
        messages = row["messages"]
        if messages[0]["role"] != "system" or len(messages) < 5 or "\n" in messages[3]["content"]:
            continue
        later.append(_instruction_of(messages[0]["content"]).follows(messages[4]["content"]))
    assert len(later) > 40 and sum(later) / len(later) < 0.4


def test_heldout_dialogues_have_eight_turns_of_prompts_no_training_review_begins():
    from pipeline.data.builtin_sentiment import _train_prefixes

    rows = load_rows("heldout", 5)
    train = _train_prefixes(0, 2, 8)
    for row in rows:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        assert len(users) == 8 and not any(u in train for u in users)


# --------------------------------------------------------------------------- a tiny chat model


TINY_CHAT = "{type: llama, n_layer: 1, n_head: 2, n_embd: 32, n_positions: 384, vocab_size: 400}"


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    """`make gatt`'s first step, configs/gatt/sft.yaml, shrunk: a 1-layer llama after 40 steps on 300
    built-in dialogues, enough to end its turns with EOS. Returns its model folder."""
    out = tmp_path_factory.mktemp("chat")
    run_ok(
        "sft",
        "configs/gatt/sft.yaml",
        *sets(
            f"output_dir={out}",
            f"model.architecture={TINY_CHAT}",
            "data.train.0.max_rows=300",
            "data.eval.0.max_rows=10",
            "train.max_steps=40",
            "train.batch_size=16",
            "train.micro_batch_size=16",
            "optim.lr=1e-2",
            "sample.num_prompts=0",
        ),
    )
    return out / "model"


@pytest.fixture(scope="module")
def chat_tokenizer(chat_policy):
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(chat_policy)))


def gatt_config(tmp_path, policy, **extra) -> dict:
    return {
        "output_dir": str(tmp_path / "gatt"),
        "model": {"name_or_path": str(policy)},
        "dialogues": {"path": "builtin:dialogues", "format": "messages", "split": "gatt"},
        "num_dialogues": 6,
        "turns": [2, 3],
        "only_adherent": False,  # an untrained model follows nothing; every finished reply is kept
        "short_fraction": 0.5,
        "sample": {"max_new_tokens": 40, "temperature": 1.0},
        "batch_size": 4,
        **extra,
    }


def test_gatt_examples_token_by_token(tmp_path, chat_policy, chat_tokenizer):
    from pipeline import gatt
    from pipeline.models import load_causal_lm

    cfg = config_from_dict(GattConfig, gatt_config(tmp_path, chat_policy))
    out = gatt.run(cfg)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dialogues"] == 6 and summary["examples"] == len(rows) > 0

    # What the policy sampled, re-drawn with the same seed: every user turn carried the instructions.
    dialogues = [d for d in load_rows("gatt", 6)]
    plans = [
        gatt.plan_dialogue([m["content"] for m in d["messages"] if m["role"] == "user"], i, cfg, INSTRUCTIONS)
        for i, d in enumerate(dialogues)
    ]
    prompts = [(None, [with_instruction(given.text(), u) for u in users]) for given, users, _ in plans]
    render = chat_renderer(chat_tokenizer)
    torch.manual_seed(cfg.seed)
    rollouts = roll_out(
        load_causal_lm(cfg.model),
        chat_tokenizer,
        render,
        prompts,
        cfg.sample,
        cfg.max_length,
        cfg.batch_size,
        torch.Generator().manual_seed(cfg.seed),
    )
    sampled = {
        (d["id"], t + 1): (r.replies, r.finished[t]) for d, r in zip(dialogues, rollouts) for t in range(len(r.replies))
    }
    assert len(rows) == sum(done for _, done in sampled.values())  # every finished reply, nothing else

    data = DataConfig(max_length=384, max_prompt_length=128)
    for row in rows:
        dialogue_id, turn = row["id"].rsplit("/turn-", 1)
        index = int(dialogue_id.rsplit("-", 1)[1])
        given, users, short = plans[index]
        replies, _ = sampled[(dialogue_id, int(turn))]
        messages = row["messages"]
        # The instructions are in the system message only, in the wording the plan drew.
        assert messages[0] == {"role": "system", "content": given.text(short)}
        assert [m["content"] for m in messages if m["role"] == "user"] == users[: int(turn)]
        assert [m["content"] for m in messages if m["role"] == "assistant"] == replies[: int(turn)]
        assert [m.get("weight") for m in messages if m["role"] == "assistant"] == [0] * (int(turn) - 1) + [1]

        # Through SFT's own reader and tokenizer: the loss is on the last reply and its end of turn only.
        example = messages_example({"_id": row["id"], "messages": messages}, render)
        tokenized = tokenize_sft(chat_tokenizer, example, data)
        trained = [i for i, label in enumerate(tokenized.labels) if label != IGNORE]
        assert trained == list(range(trained[0], len(tokenized.input_ids)))  # one run, at the end
        assert chat_tokenizer.decode([tokenized.input_ids[i] for i in trained]) == replies[int(turn) - 1] + "<|im_end|>"
        assert all(tokenized.labels[i] == tokenized.input_ids[i] for i in trained)
        text = chat_tokenizer.decode(tokenized.input_ids)
        assert text.count(given.text(short)) == 1 and text.index(given.text(short)) < text.index("<|im_start|>user")


def test_gatt_from_a_users_messages_file_and_instruction_list(tmp_path, chat_policy):
    """A user's dialogues: their system message stays (after the instructions), their replies are
    resampled, a row without a user turn is counted, and an instruction with no check always passes."""
    from pipeline import gatt

    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "OLD REPLY"},
                {"role": "user", "content": "and then?"},
            ]
        },
        {"messages": [{"role": "assistant", "content": "nobody asked"}]},
        {"messages": [{"role": "user", "content": "tell me about the film"}]},
    ]
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict(
        GattConfig,
        gatt_config(
            tmp_path,
            chat_policy,
            dialogues={"path": str(path), "format": "messages"},
            instructions=[{"text": "talk like a pirate."}],
            only_adherent=True,
            short_fraction=0.0,
            turns=[2, 2],
        ),
    )
    out = gatt.run(cfg)
    written = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dialogues"] == 2 and summary["not_trained"]["failing_instructions"] == 0
    assert summary["adherence_by_turn"][0]["checked"] == 0  # nothing to check, nothing guessed
    systems = {"dialogues.jsonl:0": "talk like a pirate.\nbe brief.", "dialogues.jsonl:2": "talk like a pirate."}
    users = {"dialogues.jsonl:0": ["hi", "and then?"], "dialogues.jsonl:2": ["tell me about the film"]}
    assert {row["id"].split("/")[0] for row in written} <= set(systems)
    for row in written:
        dialogue, turn = row["id"].split("/turn-")
        assert row["messages"][0] == {"role": "system", "content": systems[dialogue]}
        assert all(m["content"] != "OLD REPLY" for m in row["messages"])
        assert [m["content"] for m in row["messages"] if m["role"] == "user"] == users[dialogue][: int(turn)]


def test_a_weight_other_than_0_or_1_drops_the_row_and_all_zero_weights_train_nothing(chat_tokenizer):
    render = chat_renderer(chat_tokenizer)
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0.5}]
    with pytest.raises(Drop, match="'weight' is 0.5, not 0 or 1"):
        messages_example({"_id": "x", "messages": bad}, render)
    silent = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]
    with pytest.raises(Drop) as dropped:
        messages_example({"_id": "x", "messages": silent}, render)
    assert dropped.value.reason == "empty response"


# ----------------------------------------------------------------------------- the evaluation


def test_adherence_scores_hand_made_dialogues_turn_by_turn():
    given = [Combined((FAN,)), Combined((FAN, POPCORN)), Combined((PIRATE,))]
    rollouts = [
        Rollout(["a lovely film.", "a boring mess.", "great fun."], [True] * 3),
        Rollout(["lovely, with popcorn.", "lovely."], [True] * 2),  # stopped after two turns
        Rollout(["arr", "arr", "arr"], [True] * 3),  # nothing checkable
    ]
    per_turn, per_check = score(rollouts, given, 3)
    assert per_turn == [[1.0, 1.0, None], [0.0, 0.0, None], [1.0, None, None]]
    assert per_check == {"sentiment": [[1.0, 1.0], [0.0, 1.0], [1.0]], "contains": [[1.0], [0.0], []]}

    cfg = AdherenceConfig.__new__(AdherenceConfig)
    cfg.turns, cfg.bootstrap_resamples, cfg.seed = 3, 200, 0
    after = [[1.0, 1.0, None], [1.0, 1.0, None], [None, None, None]]
    results = summarize({"before": per_turn, "after": after}, {}, {}, cfg, ["before", "after"], 3)
    turn2 = results["by_turn"][1]
    assert turn2["before"]["mean"] == 0.0 and turn2["after"]["mean"] == 1.0 and turn2["before"]["n"] == 2
    assert turn2["difference"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    turn3 = results["by_turn"][2]
    assert turn3["before"]["n"] == 1 and turn3["after"] is None and "difference" not in turn3  # nothing to pair
    assert table_lines(results)[3].startswith("| 2 | 0.0% [0.0, 0.0] | 100.0% [100.0, 100.0] | +100.0")


def test_attention_on_the_system_message_is_a_share_per_layer_and_reply(chat_policy, chat_tokenizer):
    from pipeline.config import ModelConfig
    from pipeline.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(chat_policy)))
    model.set_attn_implementation("eager")
    messages = [
        {"role": "system", "content": "fan: positive."},
        {"role": "user", "content": "i saw it"},
        {"role": "assistant", "content": "it was great."},
        {"role": "user", "content": "and this one"},
        {"role": "assistant", "content": "lovely."},
    ]
    ids, spans = message_spans(chat_tokenizer, chat_renderer(chat_tokenizer), messages)
    text = chat_tokenizer.decode
    assert text(ids) == "<|endoftext|>" + render_chat(messages, False)
    assert text(ids[spans[0].start : spans[0].end]) == "<|im_start|>system\nfan: positive.<|im_end|>"
    assert text(ids[spans[0].content_start : spans[0].content_end]) == "fan: positive."
    assert text(ids[spans[4].content_start : spans[4].content_end]) == "lovely."
    # What the sampler produced for a reply: its content and the end of turn, nothing of the header.
    first, stop = generated(spans[4], ids, chat_tokenizer.eos_token_id)
    assert text(ids[first:stop]) == "lovely.<|im_end|>" and stop == len(ids)

    system = (spans[0].content_start, spans[0].content_end)
    replies = [generated(spans[2], ids, chat_tokenizer.eos_token_id), (first, stop)]
    mass = attention_on(model, ids, system, replies)
    assert mass.shape == (1, 2) and bool(((mass > 0) & (mass < 1)).all())
    # By hand: the attention weights of the positions whose next token is a reply token, summed over
    # the system message's content keys, averaged over heads and positions.
    out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    predicting = [q for q in range(len(ids) - 1) if first <= q + 1 < stop]
    weights = out.attentions[0][0][:, predicting][:, :, system[0] : system[1]]  # (H, Q, system)
    assert abs(float(mass[0, 1]) - float(weights.sum(-1).mean())) < 1e-6


def test_a_dialogue_whose_context_would_overflow_stops_there(chat_policy, chat_tokenizer):
    from pipeline.config import ModelConfig, SampleConfig
    from pipeline.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(chat_policy)))
    users = [m["content"] for m in load_rows("heldout", 1)[0]["messages"] if m["role"] == "user"]
    settings = SampleConfig(max_new_tokens=16, temperature=1.0)
    rollouts = roll_out(
        model,
        chat_tokenizer,
        chat_renderer(chat_tokenizer),
        [("fan: positive.", users)] * 3,
        settings,
        80,
        3,
        torch.Generator().manual_seed(0),
    )
    for rollout in rollouts:
        assert 1 <= len(rollout.replies) < len(users) and len(rollout.finished) == len(rollout.replies)
    per_turn, _ = score(rollouts, [Combined((FAN,))] * 3, len(users))
    assert per_turn[-1] == [None, None, None]  # not reached: not counted as failing


# ---------------------------------------------------------------------------------- configs


def test_gatt_and_adherence_configs_are_checked(tmp_path, chat_policy):
    ok = gatt_config(tmp_path, chat_policy)
    config_from_dict(GattConfig, ok)
    problems = {
        "combine": ([0, 2], "combine: expected"),
        "turns": ([3, 1], "turns: expected"),
        "dialogues": ({"path": "my.jsonl", "format": "messages"}, "instructions: name the instructions"),
        "short_fraction": (1.5, "short_fraction: must be between"),
    }
    for key, (value, message) in problems.items():
        with pytest.raises(Exception, match=message):
            config_from_dict(GattConfig, {**ok, key: value})
    with pytest.raises(Exception, match="dialogues.format: builtin:dialogues holds chats; use format 'messages'"):
        config_from_dict(GattConfig, {**ok, "dialogues": {"path": "builtin:dialogues", "format": "reviews"}})
    with pytest.raises(Exception, match="dialogues.format: dialogues are read as 'messages', not 'text'"):
        config_from_dict(
            GattConfig, {**ok, "dialogues": {"path": "d.jsonl", "format": "text"}, "instructions": [{"text": "hi"}]}
        )
    with pytest.raises(Exception, match=r"instructions.0.contains: expected one word"):
        config_from_dict(GattConfig, {**ok, "instructions": [{"text": "say hi", "contains": "two words"}]})
    free = {"models": [{"name": "a", "path": str(chat_policy)}], "dialogues": {"path": "d.jsonl", "format": "messages"}}
    with pytest.raises(Exception, match="none has a check"):
        config_from_dict(AdherenceConfig, {**free, "instructions": [{"text": "talk like a pirate"}]})
    # Through the command line: one line, exit 2, nothing loaded.
    path = write_yaml(tmp_path / "gatt.yaml", ok)
    result = run_cli("data", "gatt", str(path), *sets("num_dialogue=3"))
    assert result.returncode == 2 and "num_dialogues" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------- the chain


def test_the_gatt_chain_end_to_end_on_a_tiny_model(tmp_path, chat_policy):
    """`make gatt`'s configs shrunk through --set: (chat SFT, the fixture) -> GAtt data -> the GAtt
    fine-tune -> adherence of both models, each through the command line."""
    data, tuned, adherence = (tmp_path / name for name in ("data", "tuned", "adherence"))
    run_ok(
        "data",
        "gatt",
        "configs/gatt/data.yaml",
        *sets(
            f"output_dir={data}",
            f"model.name_or_path={chat_policy}",
            "dialogues.max_rows=12",
            "num_dialogues=12",
            "only_adherent=false",  # a 40-step model follows little; keep every finished reply
            "sample.temperature=1.0",
            "batch_size=6",
        ),
    )
    run_ok(
        "sft",
        "configs/gatt/tune.yaml",
        *sets(
            f"output_dir={tuned}",
            f"model.name_or_path={chat_policy}",
            f"data.train.0.path={data / 'train.jsonl'}",
            "data.eval_fraction=0.0",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "sample.num_prompts=0",
        ),
    )
    run_ok(
        "adherence",
        "configs/gatt/adherence.yaml",
        *sets(
            f"output_dir={adherence}",
            f"models=[{{name: before, path: {chat_policy}}}, {{name: after, path: {tuned / 'model'}}}]",
            "dialogues.max_rows=6",
            "num_dialogues=6",
            "turns=4",
            "attention_dialogues=2",
            "sample.max_new_tokens=16",
            "bootstrap_resamples=100",
        ),
    )
    summary = json.loads((data / "summary.json").read_text())
    assert summary["dialogues"] == 12 and summary["examples"] > 0
    assert [row["turn"] for row in summary["adherence_by_turn"]] == [1, 2, 3]
    assert "| turn | replies checked | follow the instructions |" in (data / "README.md").read_text()
    assert read_metrics(tuned)[-1]["step"] == 3

    results = json.loads((adherence / "results.json").read_text())
    assert results["models"] == ["before", "after"] and results["chance"] and results["turns"] == 4
    assert [row["turn"] for row in results["by_turn"]] == [1, 2, 3, 4]
    for name in ("before", "after"):
        grid = results["attention"][name]
        assert len(grid) == 1 and len(grid[0]) == 4 and all(0 < v < 1 for v in grid[0])  # 1 layer x 4 turns
    report = (adherence / "report.md").read_text()
    assert "| turn | before | after | chance | after - before (points) |" in report
    assert (adherence / "attention.png").stat().st_size > 0 and (adherence / "adherence.png").stat().st_size > 0


def test_make_gatt_names_every_gatt_config_and_each_loads():
    experiment = yaml.safe_load((ROOT / "configs" / "gatt" / "experiment.yaml").read_text())
    named = {step["config"] for step in experiment["steps"]}
    assert named == {f"configs/gatt/{p.name}" for p in (ROOT / "configs" / "gatt").glob("*.yaml")} - {
        "configs/gatt/experiment.yaml"
    }
    for step in experiment["steps"]:
        config_from_dict(STAGES[step["stage"]], yaml.safe_load((ROOT / step["config"]).read_text()), check=False)
    assert "gatt:" in (ROOT / "Makefile").read_text()


def test_inputs_that_leave_nothing_to_build_or_measure_fail_in_one_line(tmp_path, chat_policy):
    """Every reply cut at the token limit (nothing to train on), and dialogues too short for the
    turns asked: exit 2, ending in one error line that names why, no traceback."""
    cut = run_cli(
        "data",
        "gatt",
        "configs/gatt/data.yaml",
        *sets(
            f"output_dir={tmp_path / 'data'}",
            f"model.name_or_path={chat_policy}",
            "num_dialogues=3",
            "dialogues.max_rows=3",
            "sample.max_new_tokens=1",
        ),
    )
    last = cut.stderr.strip().splitlines()[-1]
    assert cut.returncode == 2 and "Traceback" not in cut.stderr
    assert last.startswith("error: gatt: no sampled reply could be kept") and "cut at sample.max_new_tokens" in last
    short = run_cli(
        "adherence",
        "configs/gatt/adherence.yaml",
        *sets(
            f"output_dir={tmp_path / 'adherence'}",
            f"models=[{{name: a, path: {chat_policy}}}]",
            "dialogues.max_rows=2",
            "turns=9",
        ),
    )
    assert short.returncode == 2 and "Traceback" not in short.stderr
    assert short.stderr.strip().splitlines()[-1] == "error: builtin:dialogues: no dialogue has 9 user turns"
