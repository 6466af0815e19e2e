"""Interactive chat: a read-eval-print loop over `generate.stream_reply`, keeping the conversation history.

Commands: `/reset` clears the history (the system prompt stays), `/exit` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable

from .data.template import ChatTemplate
from .generate import stream_reply

COMMANDS = {"/reset": "forget the conversation so far", "/exit": "leave"}


def chat_loop(model, tokenizer, tmpl: ChatTemplate, read_line: Callable[[], str | None],
              write: Callable[[str], None], system: str | None = None, max_new_tokens: int = 512,
              do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[dict]:
    """Run until `/exit` or `read_line()` returns None (EOF); returns the history at exit.

    `write` receives the reply text as it streams, then a newline.
    """
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        line = read_line()
        if line is None or line.strip() == "/exit":
            return history
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = list(start)
            write("(conversation reset)\n")
            continue
        history.append({"role": "user", "content": line})
        reply = stream_reply(model, tokenizer, history, tmpl, write, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature, top_p=top_p)
        write("\n")
        history.append({"role": "assistant", "content": reply})
