"""`sftlab report`: a self-contained HTML file with every section, data text escaped, rendered by Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess

import pytest
from rich.console import Console

from sftlab.report.html import SECTIONS, load_run, write_report

EVIL = "<script>alert('x')</script><img src=x onerror=alert(1)><a href='javascript:alert(2)'>j</a>"


def _delta(d, w=0.02):
    return {"delta": d, "ci95": [d - w, d + w], "n": 4}


def fake_eval(gain: float, forgetting: float) -> dict:
    """A metrics.json as `sftlab eval` writes it (schema_version 1), with markup in data text."""
    def task(nll, seen):
        return {"n": 4, "seen": seen, "nll": nll, "exact_match": 0.25, "rouge_l": 0.5, "accuracy": None}

    def res(shift):
        return {"tasks": {"ag_news": task(1.0 - shift, True), EVIL: task(2.0 - shift / 2, False)},
                "macro": {"all": {"tasks": 2, "n": 8, "nll": 1.5, "exact_match": 0.25, "rouge_l": 0.5, "accuracy": None},
                          "seen": None, "unseen": None},
                "general": {"qa": {"nq/dev.jsonl": {"n": 4, "gold_nll": 3.0 + shift, "exact_match": 0.1, "contains": 0.2}},
                            "text": {"wiki.txt": {"windows": 2, "tokens": 60, "nll": 2.0, "perplexity": 7.39}}}}

    metric_deltas = {m: _delta(-gain if m == "nll" else 0.1) for m in ("nll", "exact_match", "rouge_l")}
    return {
        "schema_version": 1, "created": "2025-01-01T00:00:00+00:00", "wall_s": 1.0, "model": "RUN/model",
        "base": "default", "template": "default", "options": {}, "training_tasks": ["ag_news"], "data": {},
        "results": {"model": res(gain), "base": res(0.0)},
        "deltas": {"tasks": {"ag_news": metric_deltas, EVIL: metric_deltas},
                   "macro": {"all": metric_deltas, "seen": metric_deltas, "unseen": metric_deltas},
                   "general": {"qa": {"nq/dev.jsonl": {"gold_nll": _delta(forgetting), "exact_match": _delta(-0.05),
                                                       "contains": _delta(0.0)}},
                               "text": {"wiki.txt": {"nll": _delta(0.01), "perplexity_ratio": 1.01}}}},
        "few_shot": None,
        "generations": [{"kind": "task", "task": "ag_news", "where": "f.jsonl:1", "prompt": f"Classify {EVIL} & co",
                         "reference": "Business", "model": f"Business {EVIL}", "base": "World", "base_k_shot": None}],
    }


def make_run(root, name: str, gain: float, forgetting: float):
    run = root / name
    (run / "audit").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 3, "final_loss": 1.2, "eval_loss": 1.4, "tasks": ["ag_news"]}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.6}, {"step": 2, "eval_loss": 1.7}, {"step": 3, "loss": 1.2}]))
    rows = [{"index": i, "task": ["ag_news", EVIL][i % 2], "s_cond": 1.0 + i / 10, "s_uncond": 2.0 + i / 7,
             "ifd": (1.0 + i / 10) / (2.0 + i / 7), "n_response_tokens": 3} for i in range(12)]
    (run / "audit" / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = {"n": 6, "s_cond": {"mean": 1.2, "p50": 1.2}, "s_uncond": {"p50": 2.5}, "ifd": {"p50": 0.48},
             "share_ifd_gt_1": 0.0, "exact_match": 0.5, "verdict": "known", "reason": f"matched {EVIL}"}
    (run / "audit" / "tasks.json").write_text(json.dumps({"thresholds": {"known_match": 0.5},
                                                          "tasks": {"ag_news": stats, EVIL: stats}, "overall": stats}))
    (run / "eval" / "metrics.json").write_text(json.dumps(fake_eval(gain, forgetting)))
    return run


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = [make_run(root, "full-ft", 0.5, 0.3), make_run(root, "lora", 0.3, 0.05)]
    return write_report(runs, root / "report.html", quiet())


def test_report_sections_escaped_self_contained(report):
    page = report.read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f"<section id='{sid}'>" in page
    # data text never becomes markup: the only <script> anywhere is the escaped one
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "Classify &lt;script&gt;" in page and "&amp; co" in page
    # self-contained: no external resources, figures inline
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page)
    imgs = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert imgs and all(src.startswith("data:image/png;base64,") for src in imgs)
    # audit scatter x2, loss, per-task bars (NLL, ROUGE-L) x2, trade-off
    assert len(imgs) == 2 + 1 + 4 + 1
    # forgetting with CIs: full-ft's gold NLL rose significantly, shown but not coloured (a change of answer
    # format alone moves it: forgetting.FORMAT_SENSITIVE)
    assert "<span>+0.300 [+0.280, +0.320]</span>" in page and "gold_nll (format-sensitive)" in page
    assert "verdict-known" in page and "full-ft" in page and "lora" in page


def test_report_single_run_and_errors(tmp_path):
    run = make_run(tmp_path, "only", 0.2, 0.1)
    page = write_report([run], tmp_path / "one.html", quiet()).read_text()
    assert "needs at least two runs" in page  # trade-off needs two runs
    assert load_run(run).eval["schema_version"] == 1
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to report"):
        load_run(tmp_path / "empty")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid JSON"):
        load_run(run)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(chromium() is None and os.environ.get("CI") != "true",
                    reason="chromium not installed (apt-get install chromium); required in CI")
def test_report_renders_in_chromium(report, tmp_path):
    assert chromium(), "CI=true but chromium is missing: .ci/run installs it"
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    r = run_chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert console_messages(r.stderr) == []
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0 and console_messages(dom.stderr) == []
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in dom.stdout
    assert "<script" not in dom.stdout and "&lt;script&gt;" in dom.stdout
    # data and model text never becomes markup: no element from it, no javascript: link, no inline handler
    assert '<img src="x"' not in dom.stdout and "&lt;img src=x onerror=alert(1)&gt;" in dom.stdout
    assert 'href="javascript:' not in dom.stdout and not re.search(r"<[^>]+\sonerror=", dom.stdout)
    # the console check has teeth: a page that throws is caught by it
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    assert any("Uncaught Error: boom" in line for line in console_messages(run_chromium(tmp_path, "--dump-dom",
                                                                                         bad.resolve().as_uri()).stderr))


def test_load_run_reads_training_of_a_run_directory(tmp_path):
    """`sftlab report RUN` on an `sftlab run` directory finds the training log in RUN/train."""
    from sftlab.report.html import load_run

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "summary.json").write_text(json.dumps({"steps": 3, "eval_loss": 1.5}))
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 2.0 - i / 10}) + "\n"
                                                              for i in (1, 2, 3)))
    run = load_run(tmp_path)
    assert run.summary["steps"] == 3 and [r["loss"] for r in run.train_log] == [1.9, 1.8, 1.7]


def test_load_run_finds_the_audit_its_training_data_was_selected_from(tmp_path):
    """An audit written elsewhere (`sftlab audit --out A`, `sftlab select A --out sel.jsonl`, training on sel.jsonl)
    is found from the training dir, and from an eval of its model, without passing it as a second run."""
    src = make_run(tmp_path / "src", "audited", 0.1, 0.0)
    audit = tmp_path / "somewhere" / "my-audit"
    shutil.copytree(src / "audit", audit)
    sel = tmp_path / "data" / "sel.jsonl"
    sel.parent.mkdir()
    sel.write_text("")
    (tmp_path / "data" / "sel.summary.json").write_text(json.dumps({"audit_dir": str(audit), "strategy": "ifd-top"}))
    train = tmp_path / "out"
    (train / "model").mkdir(parents=True)
    (train / "summary.json").write_text(json.dumps({"steps": 3}))
    (train / "config.yaml").write_text(f"data:\n  train:\n  - {sel}\n")
    run = load_run(train)
    assert run.audit_dir == audit and run.audit_tasks["tasks"]["ag_news"]["verdict"] == "known"
    ev = tmp_path / "eval"
    ev.mkdir()
    metrics = fake_eval(0.1, 0.0)
    metrics["model"] = str(train / "model")
    (ev / "metrics.json").write_text(json.dumps(metrics))
    run = load_run(ev)
    assert run.audit_dir == audit and len(run.audit_rows) == 12
    page = write_report([ev], tmp_path / "r.html", quiet()).read_text()
    assert "found through its selection" in page and str(audit) in page


def test_task_rows_link_to_their_worst_examples(tmp_path):
    from sftlab.report.html import worst_examples

    run = make_run(tmp_path, "run", 0.2, 0.0)
    rows = []
    for i in range(5):
        for role, gen in (("model", f"answer {i} {EVIL}"), ("base", f"base answer {i}")):
            rows.append({"model": role, "kind": "task", "where": f"t.jsonl:{i + 1}", "task": "ag_news",
                         "reference": f"ref {i}", "generation": gen, "exact_match": float(i == 4),
                         "rouge_l": i / 10, "nll": 1.0 + i})
    rows.append({"model": "model", "kind": "qa", "where": "q.jsonl:1", "generation": "x"})
    (run / "eval" / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    worst = worst_examples(load_run(run).eval_rows)
    assert [r["where"] for r in worst["ag_news"]] == ["t.jsonl:1", "t.jsonl:2", "t.jsonl:3"]  # wrong, low ROUGE-L
    assert worst["ag_news"][0]["base_generation"] == "base answer 0"
    page = write_report([run], tmp_path / "r.html", quiet()).read_text()
    assert "<a href='#worst-0-0'>ag_news</a>" in page and "<details id='worst-0-0'>" in page
    assert "base answer 0" in page and "base answer 4" not in page and EVIL not in page  # escaped


def test_tradeoff_reads_forgetting_from_the_format_independent_measure(tmp_path):
    from sftlab.report.html import Run, section_tradeoff

    runs = []
    for name, acc in (("a", -0.10), ("b", 0.02)):
        m = fake_eval(0.3, 0.5)
        m["deltas"]["general"]["qa"]["nq/dev.jsonl"]["choice_accuracy"] = _delta(acc)
        runs.append(Run(name, tmp_path, eval=m))
    html = section_tradeoff(runs)
    assert "choice accuracy lost" in html and "forgetting (points)" in html
    assert "<td class='num'>10.000</td>" in html  # run a lost 10 points of choice accuracy
    del runs[1].eval["deltas"]["general"]["qa"]["nq/dev.jsonl"]["choice_accuracy"]  # not common: next measure
    assert "NLL/token of the first text file" in section_tradeoff(runs)


def test_pareto_front_keeps_only_undominated_runs(tmp_path):
    from sftlab.report.html import Run, pareto_front, section_tradeoff

    pts = [{"name": "sft", "gain": 1.0, "forgetting": 5.0}, {"name": "kl", "gain": 0.6, "forgetting": 1.0},
           {"name": "worse", "gain": 0.5, "forgetting": 2.0},  # kl has more gain and less forgetting
           {"name": "tie", "gain": 1.0, "forgetting": 6.0},  # sft: same gain, less forgetting
           {"name": "none", "gain": 0.0, "forgetting": 0.0}]
    assert pareto_front(pts) == {"sft", "kl", "none"}
    runs = []
    for name, gain, acc in (("sft", 0.5, -0.08), ("kl", 0.3, -0.01), ("worse", 0.2, -0.05)):
        m = fake_eval(0.3, 0.5)
        m["deltas"]["macro"]["all"]["nll"] = _delta(-gain)
        m["deltas"]["macro"]["seen"] = None
        m["deltas"]["general"]["qa"]["nq/dev.jsonl"]["choice_accuracy"] = _delta(acc)
        runs.append(Run(name, tmp_path, eval=m))
    html = section_tradeoff(runs)
    rows = {r.split("</td>")[0].split(">")[-1]: r for r in html.split("<tr>")[2:]}
    assert rows["sft"].rstrip().endswith("<td>yes</td></tr>") and rows["kl"].rstrip().endswith("<td>yes</td></tr>")
    assert "<td>yes</td>" not in rows["worse"] and "Pareto front" in html


def test_headline_says_what_was_learned_generalised_and_forgotten(tmp_path):
    from sftlab.report.html import Run, section_headline

    run = make_run(tmp_path, "run", 0.4, 0.0)
    m = fake_eval(0.4, 0.0)
    m["results"]["model"]["macro"]["seen"] = {"tasks": 1, "n": 4, "nll": 0.6, "exact_match": 0.75, "rouge_l": 0.8,
                                             "accuracy": 0.75, "majority_baseline": 0.5}
    m["results"]["base"]["macro"]["seen"] = {"tasks": 1, "n": 4, "nll": 1.0, "exact_match": 0.25, "rouge_l": 0.5,
                                            "accuracy": 0.25, "majority_baseline": 0.5}
    qa = m["results"]["model"]["general"]["qa"]["nq/dev.jsonl"]
    qa["choice_accuracy"], m["results"]["base"]["general"]["qa"]["nq/dev.jsonl"]["choice_accuracy"] = 0.30, 0.45
    m["deltas"]["general"]["qa"]["nq/dev.jsonl"]["choice_accuracy"] = _delta(-0.15)
    (run / "eval" / "metrics.json").write_text(json.dumps(m))
    html = section_headline([load_run(run)])
    learned = html.split("Learned on seen tasks")[1].split("</li>")[0]
    assert "25.0 % → 75.0 %" in learned and "always the commonest answer: 50.0 %" in learned
    assert "Generalised to unseen tasks" not in html  # no unseen split in this evaluation
    forgot = html.split("Forgot?")[1].split("</li>")[0]
    assert "choice accuracy: 45.0 % → 30.0 %" in forgot and "forgotten (significantly lower)" in forgot
    assert "class='bad'" in forgot
    row = next(r for r in html.split("<tr>") if ">ag_news<" in r)
    assert "verdict-known" in row  # the audit's verdict beside the task's gain
    # the gold NLL alone never speaks for forgetting
    del m["deltas"]["general"]["qa"]["nq/dev.jsonl"]["choice_accuracy"], qa["choice_accuracy"]
    (run / "eval" / "metrics.json").write_text(json.dumps(m))
    assert "no format-independent measure" in section_headline([load_run(run)])
    assert "No evaluation against a base model" in section_headline([Run("x", tmp_path)])
