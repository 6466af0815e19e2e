"""Loading: the same records as JSONL, JSON array, CSV, Parquet, a directory, a glob and a `save_to_disk`
dataset give identical examples; formats are detected per file; task labels come from --task-field,
--task-map or the file stem."""

from __future__ import annotations

import csv
import json

import pytest

from sftlab.data.load import expand_paths
from sftlab.config import DataConfig
from sftlab.data.pipeline import DataReport, iter_conversations, iter_examples

RECORD_SETS = {
    "alpaca": [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
        {"instruction": "Translate, keeping \"quotes\", commas, and newlines:", "input": "«Hello», she said,\n\"hi\"",
         "output": "« Bonjour », dit-elle,\n« salut »"},
        {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
        {"instruction": "Résumé en un mot ?", "input": "日本語のテキスト 🙂", "output": "Texte."},
    ],
    "prompt_completion": [
        {"prompt": "[1, 2, 3] What is the sum of this list?", "completion": " 6"},
        {"prompt": "[not json] Label the sentiment: great movie!", "completion": " positive"},
        {"prompt": "Plain prompt,\nwith a comma", "completion": "[\"a list\", \"as text\"]"},
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "Be concise."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris, probably.", "train": False},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes: Paris."}]},
        {"messages": [{"role": "user", "content": "Hi, \"you\"!"}, {"role": "assistant", "content": "Hello,\nthere."}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                      {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]},
    ],
}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path, records):
    cols = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in r.items()})
    return path


def write_all_containers(tmp_path, records) -> dict:
    """The same records in every supported container; returns name -> the input(s) to pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    half = len(records) // 2
    ins = {"jsonl": write_jsonl(tmp_path / "recs.jsonl", records)}
    ins["json"] = tmp_path / "recs.json"
    ins["json"].write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    ins["csv"] = write_csv(tmp_path / "recs.csv", records)
    ins["parquet"] = tmp_path / "recs.parquet"
    pq.write_table(pa.Table.from_pylist(records), ins["parquet"])
    write_jsonl(tmp_path / "dir" / "part-1.jsonl", records[:half])
    (tmp_path / "dir" / "sub").mkdir()
    (tmp_path / "dir" / "sub" / "part-2.json").write_text(json.dumps(records[half:]), encoding="utf-8")
    ins["directory"] = tmp_path / "dir"
    write_jsonl(tmp_path / "g" / "shard-00.jsonl", records[:half])
    write_jsonl(tmp_path / "g" / "shard-01.jsonl", records[half:])
    (tmp_path / "g" / "notes.txt").write_text("not data")
    ins["glob"] = str(tmp_path / "g" / "shard-*.jsonl")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    ins["save_to_disk"] = tmp_path / "saved"
    return ins


@pytest.mark.parametrize("kind", list(RECORD_SETS))
def test_every_container_gives_identical_examples(tmp_path, tokenizer, kind):
    records = RECORD_SETS[kind]
    inputs = write_all_containers(tmp_path, records)
    ref = list(iter_examples([inputs["jsonl"]], tokenizer, DataConfig()))
    assert len(ref) == len(records)
    for name, inp in inputs.items():
        report = DataReport()
        exs = list(iter_examples([inp], tokenizer, DataConfig(), report))
        assert [(e.input_ids, e.labels) for e in exs] == [(e.input_ids, e.labels) for e in ref], name
        assert report.records == len(records) and report.formats == {kind: len(records)}, name
    # the task is the file stem (the directory name for a saved dataset)
    assert {e.task for e in list(iter_examples([inputs["save_to_disk"]], tokenizer, DataConfig()))} == {"saved"}
    assert [e.task for e in list(iter_examples([inputs["directory"]], tokenizer, DataConfig()))] == (
        ["part-1"] * (len(records) // 2) + ["part-2"] * (len(records) - len(records) // 2))


def test_conversations_identical_across_containers(tmp_path):
    records = RECORD_SETS["messages"]
    inputs = write_all_containers(tmp_path, records)
    ref = list(iter_conversations([inputs["jsonl"]], DataConfig()))
    for name, inp in inputs.items():
        convs = list(iter_conversations([inp], DataConfig()))
        assert [c.messages for c in convs] == [c.messages for c in ref], name
    assert [m.train for m in ref[0].messages] == [None, None, False, None, None]


def test_directory_with_saved_dataset_reads_it_once(tmp_path, tokenizer):
    from datasets import Dataset

    records = RECORD_SETS["alpaca"]
    Dataset.from_list(records[:2]).save_to_disk(str(tmp_path / "mix" / "saved"))
    write_jsonl(tmp_path / "mix" / "more.jsonl", records[2:])
    paths = expand_paths([tmp_path / "mix"])
    assert sorted(p.name for p in paths) == ["more.jsonl", "saved"]
    report = DataReport()
    exs = list(iter_examples([tmp_path / "mix"], tokenizer, DataConfig(), report))
    assert len(exs) == 4 and report.records == 4


def test_expand_paths_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_paths([tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match="glob matches no data files"):
        expand_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="directory has no"):
        expand_paths([tmp_path / "empty"])
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        expand_paths([tmp_path / "data.txt"])


def test_format_detected_per_file_and_override(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "d" / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                {"from": "gpt", "value": "Hello"}]}])
    write_jsonl(tmp_path / "d" / "c.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    write_jsonl(tmp_path / "d" / "e.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello"}]}])
    report = DataReport()
    exs = list(iter_examples([tmp_path / "d"], tokenizer, DataConfig(), report))
    assert report.formats == {"alpaca": 1, "sharegpt": 1, "prompt_completion": 1, "messages": 1}
    assert len({tuple(e.input_ids) for e in exs}) == 1  # the same conversation in four formats
    assert [e.task for e in exs] == ["a", "b", "c", "e"]
    report = DataReport()
    list(iter_examples([a], tokenizer, DataConfig(format="alpaca"), report))
    assert report.formats == {"alpaca": 1}


def test_task_labels(tmp_path, tokenizer):
    recs = [{"instruction": "Hi", "output": "Hello", "category": "greet"},
            {"instruction": "Bye", "output": "Goodbye", "category": 7}]
    path = write_jsonl(tmp_path / "ag_news_classify.jsonl", recs)
    other = write_jsonl(tmp_path / "unmapped.jsonl", recs[:1])
    assert [e.task for e in list(iter_examples([path, other], tokenizer, DataConfig()))] == [
        "ag_news_classify", "ag_news_classify", "unmapped"]
    assert [e.task for e in list(iter_examples([path], tokenizer, DataConfig(task_field="category")))] == ["greet", "7"]
    tmap = tmp_path / "map.json"
    tmap.write_text(json.dumps({"ag_news_classify": {"task": "ag_news", "cluster": "topic"}}))
    assert [e.task for e in list(iter_examples([path, other], tokenizer, DataConfig(task_map=str(tmap))))] == [
        "ag_news", "ag_news", "unmapped"]
    tmap.write_text(json.dumps({"ag_news_classify": "news", "unmapped": "misc"}))
    report = DataReport()
    assert [e.task for e in list(iter_examples([path, other], tokenizer, DataConfig(task_map=str(tmap)), report))] == [
        "news", "news", "misc"]
    assert report.tasks == {"news": 2, "misc": 1}
    tmap.write_text(json.dumps({"ag_news_classify": ["bad"]}))
    with pytest.raises(ValueError, match="ag_news_classify"):
        list(iter_examples([path], tokenizer, DataConfig(task_map=str(tmap))))


def test_shared_task_map_covers_t0_stems(shared_data):
    from sftlab.data.pipeline import load_task_map

    tmap = load_task_map(str(shared_data / "t0-tasks.json"))
    stems = {p.stem for p in (shared_data / "t0-mixture").glob("*.jsonl")}
    assert stems <= set(tmap) and len(set(tmap.values())) == 32
    assert tmap["ag_news_classify"] == "ag_news"
