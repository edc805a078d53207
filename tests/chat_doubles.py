"""A scripted stand-in for the VLM's words (random weights never write a trigger); everything else
in the chat tests is the real code."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from vila_m3.vlm.generation import GenerationResult


class ScriptedVLM:
    """Answers with the scripted texts in order (the last one repeats) and records what it was asked.

    Attributes:
        calls: one (turns, number of images, images) per generation.
    """

    is_stand_in = False

    def __init__(self, answers: Sequence[str], on_generate: Callable[[int], None] | None = None):
        self.answers = list(answers)
        self.calls: list[tuple[list[tuple[str, str]], int, list]] = []
        self.on_generate = on_generate
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "scripted test double"

    def generate(self, conversation, images=(), max_new_tokens=1024, temperature=0.0, top_p=1.0,
                 min_new_tokens=2, stream=None, cancel: threading.Event | None = None, **_) -> GenerationResult:
        with self._lock:
            number = len(self.calls)
            self.calls.append(([tuple(turn) for turn in conversation], len(images), list(images)))
            text = self.answers[min(number, len(self.answers) - 1)]
        if self.on_generate:
            self.on_generate(number)
        words = text.split(" ")
        sent = []
        for position, word in enumerate(words):
            if cancel is not None and cancel.is_set():
                return GenerationResult(" ".join(sent), len(sent), "cancelled")
            piece = word if position == 0 else " " + word
            sent.append(word)
            if stream:
                stream(piece)
        return GenerationResult(text, len(words), "stop_string")
