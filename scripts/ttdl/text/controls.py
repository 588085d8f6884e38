"""Matched controls: the matched run's pairs, with the diagnosis taken out of the text.

A control must differ from the matched run in the text alone. So a control
asks the describer source (same cache policy, same schedule) which pairs carry
text this step, exactly as the matched run would, and only then replaces each
text: by a class-name phrase (does *any* text about the class help?) or by a
one-hot code of the diagnosis (does the diagnosis help without a text encoder?).
Shuffling is the third control (objective.shuffle_texts) and needs no wrapper.
"""
from __future__ import annotations

from typing import Callable

from ttdl.text.text_sources import ClassNameTexts, Counters, TextItems
from ttdl.text.textbatch import TextBatch

Replace = Callable[[TextBatch, TextItems], list[str]]


class AtDescribedPositions:
    """A text source giving the describer's positions with other texts (`replace`)."""

    def __init__(self, describer_texts, replace: Replace):
        self.describer_texts, self.replace = describer_texts, replace

    def __call__(self, tb: TextBatch, counters: Counters) -> TextItems:
        items = self.describer_texts(tb, counters)
        return TextItems(items.positions, self.replace(tb, items), items.fresh)


def class_name_texts(class_names: list[str]) -> Replace:
    def replace(tb: TextBatch, items: TextItems) -> list[str]:
        return [ClassNameTexts.TEMPLATE.format(name=class_names[tb.classes[p]]) for p in items.positions]
    return replace


def diagnosis_codes(class_names: list[str], describer_settings) -> Replace:
    """The rules analysis of each pair's masks as a code string (ttdl.text.diagnosis_code)."""
    from ttdl.text.diagnosis_code import diagnosis_code

    def replace(tb: TextBatch, items: TextItems) -> list[str]:
        return [diagnosis_code(request, describer_settings) for request in tb.requests(items.positions, class_names)]
    return replace
