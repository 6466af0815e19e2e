"""Malformed input: one test per reason in `validate.REASONS`, through the Python API (DataError naming file,
line or record index, and reason) and the CLI (non-zero exit, the same message on stderr); --skip-invalid
counts per reason; exact duplicates reported and dropped with --dedup."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from sftlab.cli import app
from sftlab.config import DataConfig
from sftlab.data.pipeline import DataReport, iter_examples
from sftlab.data.template import TemplateError
from sftlab.data.validate import REASONS, DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
GOOD_MSGS = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}
# A template that shows only the last exchange: earlier turns vanish, so masks could not be exact.
LAST_TWO_ONLY = (
    "{% for message in messages[-2:] %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Renders the last assistant turn differently from earlier ones: earlier answers lose their reasoning (as
# Qwen3-style templates do), so what is trained for turn 1 is not what the model later sees in context.
STRIP_EARLIER_THINKING = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1] %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The last assistant turn gets a header the generation prompt does not write: training and inference differ.
FINAL_HEADER = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>final\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that rejects multi-turn conversations itself (as some do: roles must alternate, no system role).
ONE_EXCHANGE = ("{% if messages|length > 2 %}{{ raise_exception('only one exchange is supported') }}{% endif %}"
                + LAST_TWO_ONLY)
MULTI = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>hm</think>b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


# reason -> (file name, file bytes, expected location suffix, extra CLI options)
BAD_FILES = {
    "invalid_json": ("bad.jsonl", line(GOOD) + b'{"instruction": "x", "output": \n', ":2", []),
    "not_object": ("bad.jsonl", line(GOOD) + line(GOOD) + b'["instruction", "output"]\n', ":3", []),
    "wrong_type": ("bad.jsonl", line(GOOD) + line({"instruction": 5, "output": "x"}), ":2", []),
    "missing_field": ("bad.jsonl", line(GOOD_MSGS) + line({"messages": [{"role": "user"}]}), ":2", []),
    "empty_response": ("bad.jsonl", line(GOOD) + line({"instruction": "x", "input": "", "output": " \n"}), ":2", []),
    "unknown_role": ("bad.jsonl", line(GOOD_MSGS) + line({"messages": [{"role": "robot", "content": "x"},
                                                                        {"role": "assistant", "content": "y"}]}),
                     ":2", []),
    "no_assistant_turn": ("bad.jsonl", line(GOOD_MSGS) + line({"messages": [{"role": "user", "content": "x"}]}),
                          ":2", []),
    "non_utf8": ("bad.jsonl", line(GOOD) + line(GOOD).replace(b"Hi!", b"Hi\xff!"), ":2", []),
    "bom": ("bad.jsonl", b"\xef\xbb\xbf" + line(GOOD) + line(GOOD), ":1", []),
    "mixed_formats": ("bad.jsonl", line(GOOD) + line(GOOD_MSGS), ":2", []),
    "unknown_format": ("bad.jsonl", line(GOOD) + line({"question": "x", "answer": "y"}), ":2", []),
    "template": ("bad.jsonl", line(GOOD_MSGS) + line(MULTI), ":2", ["--template", "one_exchange.jinja"]),
    "no_trained_tokens": ("bad.jsonl", line(GOOD_MSGS) + line(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "train": False}]}),
        ":2", []),
}


# reasons about a whole file: reason -> (file name, file bytes)
BAD_WHOLE_FILES = {
    "empty_file": ("empty.jsonl", b"\n  \n\n"),
    "unreadable_file": ("corrupt.parquet", b"PAR1 this is not a parquet file PAR1"),
}


PROBE_REASONS = {"bad_choices"}  # a QA probe's options: tests/test_forgetting_probes.py


def test_every_reason_has_a_malformed_file():
    assert set(BAD_FILES) | set(BAD_WHOLE_FILES) | PROBE_REASONS == set(REASONS)


@pytest.fixture
def runner():
    return CliRunner()


def write_bad(tmp_path, reason):
    name, data, loc, cli = BAD_FILES[reason]
    (tmp_path / "one_exchange.jinja").write_text(ONE_EXCHANGE, encoding="utf-8")
    path = tmp_path / name
    path.write_bytes(data)
    cli = [str(tmp_path / c) if c.endswith(".jinja") else c for c in cli]
    return path, loc, cli


def options_from_cli(cli: list[str], **kw) -> DataConfig:
    return DataConfig(template=cli[1] if cli else "default", **kw)


@pytest.mark.parametrize("reason", list(BAD_FILES))
def test_reason_python_api(tmp_path, tokenizer, reason):
    path, loc, cli = write_bad(tmp_path, reason)
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, options_from_cli(cli)))
    err = e.value
    assert err.reason == reason
    assert err.where.file == str(path) and f"{err.where}" == f"{path}{loc}"
    assert str(err).startswith(f"{path}{loc}: {REASONS[reason]}")
    # --skip-invalid: the same record is counted under its reason and the good ones are kept
    report = DataReport()
    kept = list(iter_examples([path], tokenizer, options_from_cli(cli, skip_invalid=True), report))
    assert dict(report.invalid.counts) == {reason: 1}
    assert report.invalid.examples == [str(err)]
    assert len(kept) == report.kept == report.records - 1


@pytest.mark.parametrize("reason", list(BAD_FILES))
def test_reason_cli(tmp_path, runner, reason):
    path, loc, cli = write_bad(tmp_path, reason)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), *cli])
    assert result.exit_code == 1, result.output
    assert f"error: {path}{loc}: {REASONS[reason]}" in result.stderr
    assert not out.exists()  # nothing half-written
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), "--skip-invalid", *cli])
    assert result.exit_code == 0, result.output
    assert f"invalid skipped {reason}=1" in result.stderr
    assert len(out.read_text().splitlines()) == (2 if reason == "not_object" else 1)


@pytest.mark.parametrize("reason", list(BAD_WHOLE_FILES))
def test_whole_file_reasons_name_the_file_and_count_with_skip_invalid(tmp_path, tokenizer, runner, reason):
    name, data = BAD_WHOLE_FILES[reason]
    bad, good = tmp_path / name, tmp_path / "good.jsonl"
    bad.write_bytes(data)
    good.write_bytes(line(GOOD) + line(GOOD))
    with pytest.raises(DataError) as e:
        list(iter_examples([good, bad], tokenizer, DataConfig()))
    assert e.value.reason == reason and str(e.value).startswith(f"{bad}: {REASONS[reason]}")
    report = DataReport()
    assert len(list(iter_examples([good, bad], tokenizer, DataConfig(skip_invalid=True), report))) == 2
    assert dict(report.invalid.counts) == {reason: 1}
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(bad), "--out", str(out)])
    assert result.exit_code == 1 and f"error: {bad}: {REASONS[reason]}" in result.stderr, result.output
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_inputs_read_transparently_with_decompressed_line_numbers(tmp_path, tokenizer, suffix):
    import bz2
    import gzip
    import lzma

    import zstandard

    raw = line(GOOD) + line({**GOOD, "output": "Other."}) + b'{"instruction": "x", "output": \n'
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                ".zst": zstandard.ZstdCompressor().compress}[suffix]
    plain, packed = tmp_path / "d.jsonl", tmp_path / f"d.jsonl{suffix}"
    plain.write_bytes(raw)
    packed.write_bytes(compress(raw))
    with pytest.raises(DataError) as e:
        list(iter_examples([packed], tokenizer, DataConfig()))
    assert str(e.value.where) == f"{packed}:3" and e.value.reason == "invalid_json"
    a = list(iter_examples([plain], tokenizer, DataConfig(skip_invalid=True)))
    b = list(iter_examples([packed], tokenizer, DataConfig(skip_invalid=True)))
    assert len(a) == 2 and [x.input_ids for x in a] == [x.input_ids for x in b]
    assert [x.labels for x in a] == [x.labels for x in b]
    # directories and globs find compressed files too; a truncated archive names its file
    assert len(list(iter_examples([str(tmp_path / "*.jsonl*")], tokenizer, DataConfig(skip_invalid=True)))) == 4
    packed.write_bytes(compress(raw)[: len(compress(raw)) // 2])
    with pytest.raises(DataError) as e:
        list(iter_examples([packed], tokenizer, DataConfig()))
    assert e.value.reason in ("unreadable_file", "invalid_json") and e.value.where.file == str(packed)


def test_json_that_python_cannot_take_is_a_named_error(tmp_path, tokenizer):
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(line(GOOD) + b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b', "output": "y"}\n')
    with pytest.raises(DataError) as e:
        list(iter_examples([deep], tokenizer, DataConfig()))
    assert str(e.value).startswith(f"{deep}:2: {REASONS['invalid_json']}") and "nested too deeply" in str(e.value)
    lone = tmp_path / "lone.jsonl"
    lone.write_bytes(line(GOOD) + b'{"instruction": "a\\ud800b", "output": "y"}\n'
                     + b'{"instruction": "pair \\ud83d\\ude00 ok", "output": "y"}\n')
    report = DataReport()
    kept = list(iter_examples([lone], tokenizer, DataConfig(skip_invalid=True), report))
    assert len(kept) == 2 and dict(report.invalid.counts) == {"non_utf8": 1}
    assert report.invalid.examples[0].startswith(f"{lone}:2: ")
    arr = tmp_path / "lone.json"
    arr.write_bytes(b'[{"instruction": "a", "output": "b"}, {"instruction": "\\udfff", "output": "b"}]')
    with pytest.raises(DataError) as e:
        list(iter_examples([arr], tokenizer, DataConfig()))
    assert str(e.value.where) == f"{arr}[record 1]" and e.value.reason == "non_utf8"


def test_paths_that_lead_nowhere_name_themselves(tmp_path, tokenizer):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop.jsonl")
    with pytest.raises(FileNotFoundError, match="loop.jsonl: a symbolic link that points nowhere"):
        list(iter_examples([loop], tokenizer, DataConfig()))
    with pytest.raises(FileNotFoundError, match=r"nothing\*.jsonl: glob matches no data files"):
        list(iter_examples([str(tmp_path / "nothing*.jsonl")], tokenizer, DataConfig()))
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'"):
        (tmp_path / "notes.txt").write_text("x")
        list(iter_examples([tmp_path / "notes.txt"], tokenizer, DataConfig()))


# ---- other containers: the location is a line (CSV, JSON syntax) or a record index (JSON array, Parquet) -------
def test_json_array_errors_name_the_record_index(tmp_path, tokenizer):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "output": ["not", "a", "string"]}]))
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("wrong_type", f"{path}[record 2]")
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("invalid_json", f"{path}:3")
    path.write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert e.value.reason == "wrong_type" and "array" in str(e.value)


def test_csv_errors_name_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Say hi.", "", "Hi!"])
        w.writerow(["multi\nline instruction", "", "ok"])
        w.writerow(["x", "", ""])
        w.writerow(["another\nmulti-line one", "", ""])
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("empty_response", f"{path}:5")  # after a 2-line record
    report = DataReport()
    list(iter_examples([path], tokenizer, DataConfig(skip_invalid=True), report))
    assert report.invalid.examples[1].startswith(f"{path}:6: empty response")  # a record's first line
    path.write_bytes(b"instruction,input,output\nSay hi.,,Hi!\nSay hi.,,H\xe9!\n")
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("non_utf8", f"{path}:3")
    path.write_bytes(b"\xef\xbb\xbfinstruction,input,output\nSay hi.,,Hi!\n")
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("bom", f"{path}:1")
    path.write_bytes(b'messages\n"[{""role"": ""user"", ""content"": ""x""},"\n')
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("invalid_json", f"{path}:2")


def test_parquet_errors_name_the_record_index(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"instruction": "x", "input": "", "output": ""}]), path)
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig()))
    assert (e.value.reason, str(e.value.where)) == ("empty_response", f"{path}[record 1]")


def test_format_override_missing_field(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes(line(GOOD))
    for fmt, field in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", None),
                       ("prompt_completion", "prompt")):
        rec = GOOD if field else {"instruction": "x", "input": ""}
        path.write_bytes(line(rec))
        with pytest.raises(DataError) as e:
            list(iter_examples([path], tokenizer, DataConfig(format=fmt)))
        assert (e.value.reason, str(e.value.where)) == ("missing_field", f"{path}:1")
        assert repr(field or "output") in str(e.value)


@pytest.mark.parametrize("source,first_bad,kept", [(FINAL_HEADER, 1, 0)])
def test_template_without_a_ground_truth_is_an_error_not_a_wrong_mask(tmp_path, tokenizer, source, first_bad, kept):
    """A turn whose rendering does not continue its own inference prompt has no truth to train: an error naming
    the record; with skip_invalid the others are kept, and a template that fails every record is still an error."""
    tmpl = tmp_path / "odd.jinja"
    tmpl.write_text(source, encoding="utf-8")
    path = tmp_path / "data.jsonl"
    path.write_bytes(line(GOOD_MSGS) + line(MULTI) + line(GOOD_MSGS) + line(MULTI))
    with pytest.raises(DataError) as e:
        list(iter_examples([path], tokenizer, DataConfig(template=str(tmpl))))
    assert (e.value.reason, str(e.value.where)) == ("template", f"{path}:{first_bad}")
    assert "does not continue its own inference prompt" in str(e.value) and "odd.jinja" in str(e.value)
    report = DataReport()
    opts = DataConfig(template=str(tmpl), skip_invalid=True)
    if kept == 0:
        with pytest.raises(TemplateError, match="fails every record"):
            list(iter_examples([path], tokenizer, opts, report))
        return
    examples = list(iter_examples([path], tokenizer, opts, report))
    assert len(examples) == kept and dict(report.invalid.counts) == {"template": 4 - kept}
    for ex in examples:  # the single-turn examples that remain are exact
        trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]
        assert tokenizer.decode(trained) == "Hi!<|im_end|>"


def test_template_that_rewrites_history_gives_each_turn_its_inference_context(tmp_path, tokenizer):
    """Earlier answers lose their reasoning in later prompts: the conversation becomes one example per turn,
    each with exactly the context the model sees at inference before it."""
    tmpl = tmp_path / "strip.jinja"
    tmpl.write_text(STRIP_EARLIER_THINKING, encoding="utf-8")
    path = tmp_path / "data.jsonl"
    path.write_bytes(line(MULTI))
    first, second = list(iter_examples([path], tokenizer, DataConfig(template=str(tmpl))))

    def trained(ex):
        return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])

    assert tokenizer.decode(first.input_ids) == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>hm</think>b<|im_end|>\n"
    assert trained(first) == "<think>hm</think>b<|im_end|>"
    assert tokenizer.decode(second.input_ids).startswith("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>")
    assert trained(second) == "d<|im_end|>"


def test_template_that_shows_only_the_last_exchange_trains_each_turn_in_that_context(tmp_path, tokenizer):
    tmpl = tmp_path / "last_two.jinja"
    tmpl.write_text(LAST_TWO_ONLY, encoding="utf-8")
    path = tmp_path / "data.jsonl"
    path.write_bytes(line(MULTI))
    examples = list(iter_examples([path], tokenizer, DataConfig(template=str(tmpl))))
    texts = sorted(tokenizer.decode(ex.input_ids) for ex in examples)
    assert texts == ["<|im_start|>assistant\n<think>hm</think>b<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
                     "<|im_start|>assistant\nd<|im_end|>\n",
                     "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>hm</think>b<|im_end|>\n"]


def test_template_that_rewrites_content_trains_the_templates_text(tmp_path, tokenizer):
    """The truth is what the template renders for the answer (here upper-cased), what inference must produce."""
    tmpl = tmp_path / "upper.jinja"
    tmpl.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content']|upper + '\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}", encoding="utf-8")
    path = tmp_path / "data.jsonl"
    path.write_bytes(line(GOOD_MSGS))
    ex, = iter_examples([path], tokenizer, DataConfig(template=str(tmpl)))
    # the separator space is the template's text: trained, as inference generates it (` HI!`)
    assert tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]) == " HI!"


def test_skip_invalid_counts_per_reason(tmp_path, tokenizer, runner):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b"\xef\xbb\xbf" + line(GOOD) + line(GOOD) + b"{oops\n" + b"[1]\n"
                  + line({"instruction": 5, "output": "x"}) + line({"instruction": "x", "output": ""})
                  + line(GOOD_MSGS) + line({"foo": 1}) + line(GOOD).replace(b"Hi!", b"\xc3\x28")
                  + line({"instruction": "Two", "output": "Second."}))
    b = tmp_path / "b.jsonl"
    b.write_bytes(line(GOOD_MSGS) + line({"messages": [{"role": "robot", "content": "x"}]})
                  + line({"messages": [{"role": "user", "content": "x"}]}) + line({"messages": [{"role": "user"}]})
                  + line({"messages": [{"role": "user", "content": "x"},
                                       {"role": "assistant", "content": "y", "train": False}]})
                  + line({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}))
    expected = {"bom": 1, "invalid_json": 1, "not_object": 1, "wrong_type": 1, "empty_response": 1,
                "mixed_formats": 1, "unknown_format": 1, "non_utf8": 1, "unknown_role": 1, "no_assistant_turn": 1,
                "missing_field": 1, "no_trained_tokens": 1}
    report = DataReport()
    kept = list(iter_examples([tmp_path], tokenizer, DataConfig(skip_invalid=True), report))
    assert dict(report.invalid.counts) == expected
    assert report.records == 16 and report.kept == len(kept) == 4
    assert [e.task for e in kept] == ["a", "a", "b", "b"]
    with pytest.raises(DataError):
        list(iter_examples([tmp_path], tokenizer, DataConfig()))
    out = tmp_path / "out" / "x.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(a), str(b), "--out", str(out), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "4 examples kept of 16 records; 12 invalid skipped" in result.stderr
    assert len(out.read_text().splitlines()) == 4
    result = runner.invoke(app, ["data", "inspect", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["invalid"]["by_reason"] == expected and stats["kept"] == 4


def test_duplicates_reported_and_dropped(tmp_path, tokenizer, runner):
    other = {"instruction": "Say bye.", "input": "", "output": "Bye!"}
    path = tmp_path / "dups.jsonl"
    # the alpaca duplicate differs only in how the record spells it, not in the conversation
    path.write_bytes(line(GOOD) + line(other) + line({"output": "Hi!", "instruction": "Say hi."}) + line(GOOD))
    report = DataReport()
    kept = list(iter_examples([path], tokenizer, DataConfig(), report))
    assert len(kept) == 4 and report.duplicates == 2 and report.duplicates_dropped == 0
    report = DataReport()
    kept = list(iter_examples([path], tokenizer, DataConfig(dedup=True), report))
    assert len(kept) == 2 and report.duplicates == 2 and report.duplicates_dropped == 2
    assert report.first_duplicates == [f"{path}:3", f"{path}:4"]
    assert kept[0].input_ids != kept[1].input_ids
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), "--dedup"])
    assert result.exit_code == 0, result.output
    assert "2 duplicates dropped" in result.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["input_ids"] for r in rows] == [e.input_ids for e in kept]
    result = runner.invoke(app, ["data", "inspect", str(path), "--json"])
    assert json.loads(result.stdout)["duplicates"] == 2


def test_response_starting_with_whitespace_is_trained_after_its_prompt_tokens(tmp_path, tokenizer):
    """The prompt is tokenized alone, as at inference, so a response starting with newlines cannot merge into
    the header's tokens: the trained tokens are the response's own."""
    from sftlab.generate import encode_prompt
    from sftlab.data.template import resolve_template

    path = tmp_path / "data.jsonl"
    path.write_bytes(line({"instruction": "x", "input": "", "output": "\n\nHello"}))
    ex, = iter_examples([path], tokenizer, DataConfig())
    start = next(i for i, lab in enumerate(ex.labels) if lab != -100)
    assert ex.input_ids[:start] == encode_prompt([{"role": "user", "content": "x"}],
                                                 resolve_template("default", tokenizer), tokenizer)
    assert ex.input_ids[start:] == tokenizer("\n\nHello<|im_end|>\n", add_special_tokens=False).input_ids
    assert ex.labels[-1] == -100  # the newline after the end-of-turn marker is not trained
