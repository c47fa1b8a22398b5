"""Chat end to end: the built-in template, multi-turn SFT with the loss on assistant replies only,
and HH-RLHF dialogues through the same pieces."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.adapters import conversation_segments, hh_raw_segments, messages_example
from pipeline.data.loading import load_sft_examples
from pipeline.data.records import Drop, DropLedger, SFTExample
from pipeline.data.tokenize import IGNORE, collate, tokenize_sft
from pipeline.models import render_chat, train_tokenizer
from pipeline.stage_common import chat_renderer

CONVERSATION = [
    {"role": "system", "content": "You review films."},
    {"role": "user", "content": "Was it good?"},
    {"role": "assistant", "content": "Yes, a fine film."},
    {"role": "user", "content": "The cast?"},
    {"role": "assistant", "content": "The cast is great."},
    {"role": "user", "content": "Worth it?"},
    {"role": "assistant", "content": "Still, worth it."},
]


@pytest.fixture(scope="module")
def tok():
    texts = [render_chat(CONVERSATION, False)] * 20 + ["a fine film with a great cast, worth it"] * 20
    return train_tokenizer(texts, vocab_size=320)


def data(**kw) -> DataConfig:
    return DataConfig(**{"max_length": 200, "max_prompt_length": 64, **kw})


def test_the_scratch_template_is_chatml_with_eos_ending_each_turn(tok):
    for generation in (True, False):
        assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation) == render_chat(
            CONVERSATION, generation
        )
    text = render_chat(CONVERSATION[:2], True)
    assert (
        text
        == "<|im_start|>system\nYou review films.<|im_end|><|im_start|>user\nWas it good?<|im_end|><|im_start|>assistant\n"
    )
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3 and tok.eos_token == "<|im_end|>"
    # The turn markers are single special tokens no text can spell by accident.
    assert tok("<|im_start|>user")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_three_turns_train_every_reply_and_its_end_of_turn_and_nothing_else(tok):
    example = messages_example({"_id": "c", "messages": CONVERSATION}, chat_renderer(tok))
    tokenized = tokenize_sft(tok, example, data())
    ids, labels = tokenized.input_ids, tokenized.labels
    # The pieces tokenized one by one are the whole rendering tokenized at once, after one BOS.
    assert ids == [tok.bos_token_id] + tok(render_chat(CONVERSATION, False), add_special_tokens=False)["input_ids"]
    # Token by token: a label is the token itself exactly inside an assistant reply.
    tokens = tok.convert_ids_to_tokens(ids)
    in_reply, expected = False, []
    for i, token in enumerate(tokens):
        if token == "<|im_start|>":
            in_reply = False
        expected.append(ids[i] if in_reply else IGNORE)
        if token == "Ċ" and tokens[i - 1] == "assistant" and tokens[i - 2] == "<|im_start|>":
            in_reply = True  # the reply starts after "<|im_start|>assistant\n"
    assert "assistant" in tokens  # the marker parsing above did see the assistant turns
    assert labels == expected
    runs, current = [], []
    for token_id, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token_id)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [tok.decode(run) for run in runs] == [
        "Yes, a fine film.<|im_end|>",
        "The cast is great.<|im_end|>",
        "Still, worth it.<|im_end|>",
    ]
    # Padding never hides the final EOS: it is a label, the pad after it is not.
    batch = collate([tokenized, tokenize_sft(tok, SFTExample("", "a film", "x"), data())], tok.pad_token_id)
    last = len(ids) - 1
    assert batch["labels"][0, last] == tok.eos_token_id and tok.pad_token_id != tok.eos_token_id
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE).all()


def test_a_newline_after_the_end_of_turn_stays_between_turns_untrained(tok):
    qwen_like = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION[:5])

    def render(messages, generation):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if generation else "")

    tokenized = tokenize_sft(tok, messages_example({"_id": "q", "messages": CONVERSATION[:5]}, render), data())
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    # The newline between the turns is kept (the text is the template's) and never trained; the
    # last reply ends at its EOS, where sampling stops, with no second EOS after a newline.
    assert tokenized.input_ids[1:] == tok(qwen_like, add_special_tokens=False)["input_ids"][: -len(newline)]
    assert tokenized.input_ids[-1] == tok.eos_token_id and tokenized.labels[-1] == tok.eos_token_id
    eos_positions = [i for i, t in enumerate(tokenized.input_ids) if t == tok.eos_token_id]
    for i in eos_positions[:-1]:
        assert tokenized.input_ids[i + 1 : i + 1 + len(newline)] == newline
        assert tokenized.labels[i + 1] == IGNORE


def test_a_template_that_rewrites_earlier_turns_is_dropped_and_counted(tmp_path):
    def rewriting(messages, generation):
        """Puts a 'last turn' tag on the final user message: the prompt is then not a prefix."""
        text = ""
        for i, m in enumerate(messages):
            last_user = m["role"] == "user" and all(n["role"] != "user" for n in messages[i + 1 :])
            text += f"<{m['role']}{' last' if last_user else ''}>{m['content']}"
        return text + ("<assistant>" if generation else "")

    with pytest.raises(Drop, match="not a prefix") as caught:
        conversation_segments(CONVERSATION, rewriting)
    assert caught.value.reason == "template mismatch"

    path = tmp_path / "chats.jsonl"
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hi"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ledger = DropLedger()
    source = SourceConfig(path=str(path), format="messages")
    train, _ = load_sft_examples(DataConfig(train=[source], eval_fraction=0.0), ledger, render_chat)
    assert len(train) == 1 and len(train[0].segments) == 6
    assert ledger.reasons() == {"missing field": 2}  # no assistant message; not a message list


def test_a_template_that_refuses_a_conversation_drops_it():
    def strict(messages, generation):
        if messages and messages[0]["role"] == "assistant":
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant")
        return render_chat(messages, generation)

    with pytest.raises(Drop, match="refused the conversation: Conversation roles must alternate") as caught:
        conversation_segments([{"role": "assistant", "content": "hi"}], strict)
    assert caught.value.reason == "template mismatch"


def test_hh_dialogues_train_every_reply_with_or_without_a_template(tok):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue."
    raw = hh_raw_segments(dialogue)
    assert raw == (
        ("\n\nHuman: Hi\n\nAssistant:", False),
        (" Hello!", True),
        ("\n\nHuman: Name a colour.\n\nAssistant:", False),
        (" Blue.", True),
    )
    # A reply that itself writes "\n\nAssistant:" runs on to the next human turn.
    odd = hh_raw_segments("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant: e")
    assert [text for text, trained in odd if trained] == [" b\n\nAssistant: c", " e"]
    # Without a template the last reply gets the EOS; with one each reply ends with its own.
    raw_example = tokenize_sft(tok, SFTExample.conversation(raw, "h"), data())
    assert raw_example.input_ids[-1] == tok.eos_token_id and raw_example.labels.count(tok.eos_token_id) == 1
    from pipeline.data.adapters import hh_rlhf_example

    chat = tokenize_sft(tok, hh_rlhf_example({"_id": "h", "chosen": dialogue}, chat_renderer(tok)), data())
    trained = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE]
    assert tok.decode(trained) == "Hello!<|im_end|>Blue.<|im_end|>"


def test_a_long_conversation_keeps_its_start_and_a_cut_reply_gets_no_eos(tok):
    example = messages_example({"_id": "c", "messages": CONVERSATION}, render_chat)
    whole = tokenize_sft(tok, example, data())
    cut = tokenize_sft(tok, example, data(max_length=len(whole.input_ids) - 2))
    assert cut.input_ids == whole.input_ids[:-2] and cut.input_ids[-1] != tok.eos_token_id
    # A long first piece (system and user turns) is cut like any prompt: its end, which asks for the reply, stays.
    short = tokenize_sft(tok, example, data(max_length=30, max_prompt_length=8))
    first_reply = whole.trained.index(True)
    assert short.prompt_length == 8 and short.input_ids[:8] == whole.input_ids[first_reply - 8 : first_reply]
    assert short.input_ids[8:] == whole.input_ids[first_reply : first_reply + 22]


def test_data_inspect_marks_every_masked_turn(tok):
    from pipeline.data.inspect import render_example

    tokenized = tokenize_sft(tok, messages_example({"_id": "c", "messages": CONVERSATION}, render_chat), data())
    shown = render_example(tok, tokenized)
    assert shown.count("[dim]⟦") == 3  # system+first user turn, then each later user turn
    assert "⟧[/dim]Yes, a fine film.<|im_end|>[dim]⟦<|im_start|>user" in shown


def test_prompts_from_messages_leave_out_a_final_reply_and_keep_a_final_user_turn():
    from pipeline.data.adapters import messages_prompt

    record = messages_prompt({"_id": "p", "messages": CONVERSATION}, render_chat)
    assert record.prompt == render_chat(CONVERSATION[:-1], True) and record.reference == "Still, worth it."
    assert record.prompt.endswith("<|im_start|>user\nWorth it?<|im_end|><|im_start|>assistant\n")
    open_question = messages_prompt({"_id": "q", "messages": CONVERSATION[:-1]}, render_chat)
    assert open_question.prompt == record.prompt and open_question.reference is None
    with pytest.raises(Drop, match="nothing to answer"):
        messages_prompt({"_id": "r", "messages": [{"role": "assistant", "content": "hi"}]}, render_chat)
