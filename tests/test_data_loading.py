"""Sources (every file type, the built-in task, the hub's failure) and the loader's mixing rules."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.loading import load_pairs, load_prompts, load_sft_examples, source_label
from pipeline.data.records import DataError, DropLedger, PreferencePair, PromptRecord, SFTExample
from pipeline.data.sources import is_local, read_rows

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
IMDB_FILE = SHARED / "imdb" / "imdb-reviews-sample.csv.gz"

ROWS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Fish."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def numbered_pairs(path: Path, n: int) -> Path:
    """A JSON-lines file of n distinct prompt/chosen/rejected rows."""
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n")
    return path


def pcr(path: Path, **kw) -> SourceConfig:
    return SourceConfig(path=str(path), format="prompt_chosen_rejected", **kw)


# ------------------------------------------------------------------------------------------ sources


def write_every_type(folder: Path) -> list[Path]:
    """ROWS written as each local file type read_rows knows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = "".join(json.dumps(r) + "\n" for r in ROWS)
    out = {
        "list.json": json.dumps(ROWS, indent=2),
        "lines.json": lines,
        "rows.jsonl": "\n" + lines + "\n",  # blank lines are skipped
    }
    for name, text in out.items():
        (folder / name).write_text(text)
    (folder / "rows.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (folder / "list.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    with open(folder / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    (folder / "rows.csv.gz").write_bytes(gzip.compress((folder / "rows.csv").read_bytes()))
    pq.write_table(pa.Table.from_pylist(ROWS), folder / "rows.parquet")
    return sorted(folder.iterdir())


def test_every_local_type_reads_the_same_rows(tmp_path):
    paths = write_every_type(tmp_path)
    assert len(paths) == 8
    for path in paths:
        rows = read_rows(pcr(path))
        assert rows == [{**r, "_id": f"{path.name}:{i}"} for i, r in enumerate(ROWS)], path.name
        assert read_rows(pcr(path, max_rows=2)) == rows[:2], path.name


def test_own_id_column_is_the_row_id():
    rows = read_rows(SourceConfig(path=str(FIXTURES / "prompt_completion.json"), format="prompt_completion"))
    assert [r["_id"] for r in rows] == ["pc-1", "pc-2", "pc-3", "pc-4"]


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl\.gz: no such file$"):
        read_rows(pcr(tmp_path / "nope.jsonl.gz"))
    with pytest.raises(DataError, match="no such file"):
        read_rows(pcr("relative/missing.parquet"))
    with pytest.raises(DataError, match="not a file of a type read here"):
        read_rows(pcr(tmp_path))  # it exists, so it is no hub id, but it is a folder


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: not valid JSON"):
        read_rows(pcr(path))
    gz = tmp_path / "bad.json.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DataError, match=r"bad\.json\.gz: line 3: not valid JSON"):
        read_rows(pcr(gz))


def test_json_rows_must_be_objects(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([ROWS[0], ["not", "an", "object"]]))
    with pytest.raises(DataError, match="list.json: item 1: expected a JSON object, got list"):
        read_rows(pcr(path))


def test_corrupt_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="rows.jsonl.gz: cannot read"):
        read_rows(pcr(path))


def test_what_counts_as_local(tmp_path):
    assert is_local("data/x.csv.gz") and is_local(str(tmp_path))
    assert not is_local("Anthropic/hh-rlhf") and not is_local("stanfordnlp/imdb")


def test_hub_source_calls_datasets_and_names_the_failure(monkeypatch):
    import datasets

    calls = []

    def offline(path, **kwargs):
        calls.append((path, kwargs))
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    source = SourceConfig(path="Anthropic/hh-rlhf", format="hh_rlhf", data_dir="harmless-base", split="test")
    with pytest.raises(DataError) as caught:
        read_rows(source)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "Anthropic/hh-rlhf: the Hugging Face hub could not be reached; point data.*.path at a local file"
    )
    assert calls == [("Anthropic/hh-rlhf", {"name": None, "data_dir": "harmless-base", "split": "test"})]


def test_hub_source_reads_rows_and_caps_them(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: datasets.Dataset.from_list(ROWS))
    rows = read_rows(pcr("someone/prefs", max_rows=2))
    assert rows == [{**ROWS[0], "_id": "someone/prefs:0"}, {**ROWS[1], "_id": "someone/prefs:1"}]


def test_hub_unreachable_for_real():
    """The real `datasets` call, offline: it must fail at once with the one-line message."""
    code = (
        "from pipeline.config import SourceConfig\n"
        "from pipeline.data.sources import read_rows\n"
        "read_rows(SourceConfig(path='Anthropic/hh-rlhf', format='hh_rlhf', data_dir='harmless-base'))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 1
    assert "DataError: Anthropic/hh-rlhf: the Hugging Face hub could not be reached" in done.stderr


def test_builtin_sentiment_source():
    builtin = pytest.importorskip("pipeline.data.builtin_sentiment")
    rows = read_rows(SourceConfig(path="builtin:sentiment", split="test", max_rows=30))
    assert len(rows) == 30
    assert rows == [{**r, "_id": r["id"]} for r in builtin.load_rows("test", n=30)]
    assert {r["sentiment"] for r in rows} <= {"positive", "negative", "neutral"}
    ledger = DropLedger(strict=True)
    train, evaluation = load_prompts(
        DataConfig(train=[SourceConfig(split="train", max_rows=200)], eval=[SourceConfig(split="test", max_rows=50)]),
        ledger,
    )
    assert len(train) == 200 and len(evaluation) == 50
    assert all(2 <= len(p.prompt.split()) <= 8 and p.reference.startswith(" ") for p in train + evaluation)
    assert not {p.prompt + p.reference for p in train} & {p.prompt + p.reference for p in evaluation}


def test_builtin_source_errors():
    with pytest.raises(DataError, match="builtin:sentiment: no split 'validation'; valid splits: train, test"):
        read_rows(SourceConfig(split="validation"))
    with pytest.raises(DataError, match="builtin:poems: unknown built-in source"):
        read_rows(SourceConfig(path="builtin:poems"))


# ------------------------------------------------------------------------------------------- loader


def test_pairs_from_fixture_with_ledger():
    ledger = DropLedger()
    source = pcr(FIXTURES / "prompt_chosen_rejected.csv")
    train, evaluation = load_pairs(DataConfig(train=[source], eval_fraction=0.0), ledger)
    assert [p.chosen for p in train] == ["Blue.", "An apple."] and evaluation == []
    label = f"{FIXTURES / 'prompt_chosen_rejected.csv'}[train]"
    assert source_label(source) == label
    assert ledger.summary_lines() == [f"{label}: kept 2, dropped 2 (1 chosen equals rejected, 1 empty response)"]


def test_strict_mode_names_the_row():
    data = DataConfig(
        train=[SourceConfig(path=str(FIXTURES / "prompt_completion.json"), format="prompt_completion")], strict=True
    )
    with pytest.raises(DataError, match=r"prompt_completion\.json\[train\]: row pc-3 dropped \(empty response"):
        load_sft_examples(data, DropLedger(strict=True))


def test_sft_only_format_has_no_pairs():
    data = DataConfig(train=[SourceConfig(path=str(FIXTURES / "text.jsonl"), format="text")])
    with pytest.raises(DataError, match="format 'text' holds no preference pairs; use"):
        load_pairs(data, DropLedger())


def test_no_records_left_is_an_error(tmp_path):
    path = tmp_path / "ties.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    expected = r"no training records left from .*ties.jsonl\[train\]: .*1 chosen equals rejected"
    with pytest.raises(DataError, match=expected):
        load_pairs(DataConfig(train=[pcr(path)]), DropLedger())


def test_fraction_nests_and_is_deterministic(tmp_path):
    path = numbered_pairs(tmp_path / "pairs.jsonl", 200)

    def ids(fraction: float, seed: int = 0) -> list[str]:
        data = DataConfig(train=[pcr(path, fraction=fraction)], eval_fraction=0.0, seed=seed)
        return [p.source_id for p in load_pairs(data, DropLedger())[0]]

    small, large, whole = ids(0.1), ids(0.5), ids(1.0)
    assert (len(small), len(large), len(whole)) == (20, 100, 200)
    assert set(small) < set(large) < set(whole)
    assert ids(0.5) == large  # same call, same list
    assert large == sorted(large, key=lambda s: int(s.rsplit(":", 1)[1]))  # file order
    assert set(ids(0.5, seed=1)) != set(large)


def test_held_out_eval_is_disjoint_and_stable(tmp_path):
    path = numbered_pairs(tmp_path / "pairs.jsonl", 400)

    def split(fraction: float, seed: int = 0) -> tuple[set[str], set[str]]:
        data = DataConfig(train=[pcr(path, fraction=fraction)], eval_fraction=0.1, seed=seed, max_eval_examples=None)
        train, evaluation = load_pairs(data, DropLedger())
        return {p.source_id for p in train}, {p.source_id for p in evaluation}

    train, evaluation = split(1.0)
    assert not train & evaluation and len(train | evaluation) == 400
    assert len(evaluation) == 32  # about 10% of 400: each row's hash decides, not a quota
    half_train, half_eval = split(0.5)
    assert (len(half_train), len(half_eval)) == (187, 13)
    # A record's side does not depend on the fraction: nothing held out at 1.0 trains at 0.5.
    assert half_eval <= evaluation and half_train <= train
    assert split(1.0) == (train, evaluation)
    assert split(1.0, seed=3)[1] != evaluation


def test_held_out_rows_agree_across_stages(tmp_path):
    """SFT on the chosen replies and DPO on the pairs of one file hold out the same rows."""
    path = numbered_pairs(tmp_path / "pairs.jsonl", 300)
    data = DataConfig(train=[pcr(path)], eval_fraction=0.2)
    _, sft_eval = load_sft_examples(data, DropLedger())
    _, pair_eval = load_pairs(data, DropLedger())
    _, prompt_eval = load_prompts(data, DropLedger())
    ids = [r.source_id for r in pair_eval]
    assert ids == [r.source_id for r in sft_eval] == [r.source_id for r in prompt_eval]
    assert sft_eval[0] == SFTExample(pair_eval[0].prompt, pair_eval[0].chosen, ids[0])
    assert prompt_eval[0] == PromptRecord(pair_eval[0].prompt, ids[0], reference=pair_eval[0].chosen)


def test_eval_sources_and_cap(tmp_path):
    train_path = numbered_pairs(tmp_path / "train.jsonl", 50)
    eval_path = numbered_pairs(tmp_path / "eval.jsonl", 40)

    def load(cap):
        data = DataConfig(train=[pcr(train_path)], eval=[pcr(eval_path)], max_eval_examples=cap)
        return load_pairs(data, DropLedger())

    train, evaluation = load(None)
    assert len(train) == 50 and len(evaluation) == 40  # explicit eval: nothing held out of train
    assert {p.source_id.split(":")[0] for p in evaluation} == {eval_path.name}
    capped = load(10)[1]
    assert len(capped) == 10 and set(capped) < set(evaluation) and set(load(5)[1]) < set(capped)


def test_mixed_sources_keep_source_order():
    data = DataConfig(
        train=[
            SourceConfig(path=str(FIXTURES / "text.jsonl"), format="text"),
            SourceConfig(path=str(FIXTURES / "prompt_completion.json"), format="prompt_completion"),
            SourceConfig(path=str(FIXTURES / "reviews.csv"), format="reviews"),
        ],
        eval_fraction=0.0,
    )
    ledger = DropLedger()
    train, _ = load_sft_examples(data, ledger)
    assert [r.response for r in train] == [
        "The quick brown fox jumps over the lazy dog.",
        "A second line of plain text.",
        " cat",
        " 4",
        "A fine film. The cast is great but the plot drags. Still, worth it.",
        "Dull. Dull.",
    ]
    assert sum(ledger.kept.values()) == 6 and ledger.reasons() == {"empty response": 3, "missing field": 2}


def test_prompts_of_every_format():
    def tag_render(messages, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    expected = {
        "prompt_completion.json": ("prompt_completion", "2 + 2 =", " 4"),
        "hh_rlhf.jsonl": (
            "hh_rlhf",  # with a chat template, HH dialogues render as messages like every chat format
            "<user>Hi\n<assistant>Hello!\n<user>Name a colour.\n<assistant>",
            "Blue.\n",
        ),
        "prompt_chosen_rejected.csv": ("prompt_chosen_rejected", "Name a fruit.", "An apple."),
        "conversational.jsonl": ("conversational", "<user>name a colour\n<assistant>", "blue\n"),
        "ultrafeedback.jsonl": ("ultrafeedback", "<user>name a colour\n<assistant>", "blue\n"),
        "shp.jsonl": ("shp", "Why is the sky blue?", "Rayleigh scattering favours short wavelengths."),
    }
    for name, (fmt, prompt, reference) in expected.items():
        data = DataConfig(train=[SourceConfig(path=str(FIXTURES / name), format=fmt)], eval_fraction=0.0)
        records, _ = load_prompts(data, DropLedger(), tag_render)
        assert PromptRecord(prompt, records[-1].source_id, reference) == records[-1], name
    with pytest.raises(DataError, match="format 'text' holds no prompts"):
        load_prompts(DataConfig(train=[SourceConfig(path=str(FIXTURES / "text.jsonl"), format="text")]), DropLedger())


# ------------------------------------------------------------------------------------- real files


def test_hh_real_file_through_the_loader():
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    source = SourceConfig(path=str(HH_FILE), format="hh_rlhf", split="test")
    ledger = DropLedger()
    train, evaluation = load_pairs(DataConfig(train=[source], max_eval_examples=None), ledger)
    assert ledger.kept[source_label(source)] == 2303
    assert ledger.reasons(source_label(source)) == {"differing context": 5, "empty response": 4}
    assert (len(train), len(evaluation)) == (2163, 140)  # eval_fraction 0.05, seed 0
    assert isinstance(train[0], PreferencePair)
    assert train[0].source_id == "harmless-base-test.jsonl.gz:1"  # row 0 is held out
    assert evaluation[0].source_id == "harmless-base-test.jsonl.gz:0"
    assert load_pairs(DataConfig(train=[source], max_eval_examples=None), DropLedger()) == (train, evaluation)
    sft_train, _ = load_sft_examples(DataConfig(train=[source], max_eval_examples=None), DropLedger())
    # SFT reads the chosen dialogue alone, every assistant reply trained: its pieces join to the dialogue.
    by_id = {r.source_id: r for r in sft_train}
    for pair in train:
        assert "".join(text for text, _ in by_id[pair.source_id].segments) == pair.prompt + pair.chosen


def test_imdb_real_file_through_the_loader():
    if not IMDB_FILE.is_file():
        pytest.skip(f"{IMDB_FILE} is not there")
    source = SourceConfig(path=str(IMDB_FILE), format="reviews")
    ledger = DropLedger()
    train, evaluation = load_prompts(DataConfig(train=[source], max_eval_examples=100), ledger)
    assert ledger.summary_lines() == [f"{IMDB_FILE}[train]: kept 3180, dropped 0 (none)"]
    assert (len(train), len(evaluation)) == (3024, 100)  # 156 held out (5%), capped at 100
    assert all(2 <= len(p.prompt.split()) <= 8 for p in train + evaluation)
    assert all(p.prompt + p.reference == " ".join(p.prompt.split() + p.reference.split()) for p in train)
    assert load_prompts(DataConfig(train=[source], max_eval_examples=100), DropLedger()) == (train, evaluation)
    texts, _ = load_sft_examples(DataConfig(train=[source], eval_fraction=0.0), DropLedger())
    assert len(texts) == 3180 and not any("<br" in t.response for t in texts)
