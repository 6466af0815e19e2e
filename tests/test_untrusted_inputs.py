"""Nothing is executed from inputs: no pickle-based load in the package, remote model code only when asked (and
named), chat templates in a sandbox."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sftlab"


def test_no_pickle_based_load_anywhere_in_the_package():
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.|import pickle|\bdill\b|joblib\.load|np\.load\([^)]*allow_pickle=True", code):
                offenders.append(f"{f}:{n}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{f}:{n}")
    assert not offenders, offenders


def test_remote_code_is_off_by_default_and_named_when_on(tmp_path, tiny_model_dir):
    from sftlab.config import RunConfig
    from sftlab.models import load_model

    assert RunConfig().model.trust_remote_code is False
    (tiny_model_dir / "modeling_custom.py").write_text("raise SystemExit('must not run')\n")
    load_model(tiny_model_dir)  # a plain config: the .py file is never imported
    with pytest.warns(UserWarning, match=r"trust_remote_code is on: .*modeling_custom\.py"):
        load_model(tiny_model_dir, trust_remote_code=True)


def test_chat_templates_render_in_a_sandbox(tmp_path, tokenizer):
    from sftlab.data.formats import Conversation, Message
    from sftlab.data.template import TemplateError, render_conversation, resolve_template

    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}"
                    "{% endfor %}")
    tmpl = resolve_template(str(evil), tokenizer)
    with pytest.raises((TemplateError, Exception), match="unsafe|not safely|access"):
        render_conversation(Conversation([Message("user", "x"), Message("assistant", "y")]), tmpl)
