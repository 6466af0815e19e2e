"""Few-shot conversations: an example preceded by solved examples of its task, as context only.

The shots' assistant turns are demonstrations, never scored or trained (`train=False`); the target keeps
its own system prompt first and its own turns last, so its scored tokens are those of the zero-shot example.
"""

from __future__ import annotations

from dataclasses import replace

from .formats import Conversation


def shot_conversation(target: Conversation, shots: list[Conversation]) -> Conversation:
    """`target` preceded by the shots' user/assistant turns (after the target's own system prompt)."""
    msgs = target.messages
    head = [m for m in msgs[:1] if m.role == "system"]
    demo = [replace(m, train=False if m.role == "assistant" else m.train)
            for s in shots for m in s.messages if m.role != "system"]
    return Conversation(head + demo + msgs[len(head):], target.task, target.where, target.tools)
