"""Describers: turn (image, GT, PR, class) into a diagnostic sentence; chosen by name from config.

Adding a backend = one new module + one line in BACKENDS.
"""
from __future__ import annotations

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.base import Describer, DescriberError, DescriberStats, clean_answer
from ttdl.text.describers.ollama import OllamaDescriber
from ttdl.text.describers.openai import OpenAIDescriber
from ttdl.text.describers.prompt import SupportExample, build_messages, load_template, make_support_example
from ttdl.text.describers.request import DescribeRequest
from ttdl.text.describers.rules import RulesDescriber

BACKENDS: dict[str, type] = {
    "rules": RulesDescriber,
    "openai": OpenAIDescriber,
    "ollama": OllamaDescriber,
}


def build_describer(cfg: DescriberSettings, class_names: list[str], support: SupportExample | None = None,
                    template: dict | None = None) -> Describer:
    """The describer named by `cfg.backend`."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown describer backend {cfg.backend!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[cfg.backend](cfg, class_names, support, template)


def describer_for_run(cfg: DescriberSettings, class_names: list[str], dataset=None) -> Describer:
    """A run's describer; a VLM's one-shot example is the first fitting (image, class) of `dataset`.

    The prompt template is read once here and shared by the support example and the describer.
    """
    if cfg.backend == "rules":
        return build_describer(cfg, class_names)
    template = load_template(cfg.prompt_template)
    support = support_from_dataset(dataset, template, class_names) if dataset is not None else None
    return build_describer(cfg, class_names, support, template)


def support_from_dataset(dataset, template: dict, class_names: list[str]) -> SupportExample | None:
    """The prompt's solved example: the first training (image, class) that fits the template."""
    for index in range(min(len(dataset), 50)):
        sample = dataset[index]
        mask = sample.get("clean_mask", sample["mask"])  # the describer always sees the clean labels
        for c in sorted(set(mask.unique().tolist()) - {0, 255}):
            try:
                return make_support_example(sample["image"], mask, c, class_names[c], template)
            except ValueError:
                continue
    return None  # the describer falls back to its own drawn example


__all__ = [
    "BACKENDS", "DescribeRequest", "Describer", "DescriberError", "DescriberStats", "SupportExample",
    "build_describer", "build_messages", "describer_for_run", "support_from_dataset", "clean_answer", "load_template",
    "make_support_example",
]
