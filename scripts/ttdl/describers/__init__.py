"""Describers: turn (image, GT, PR, class) into a diagnostic sentence; chosen by name from config.

Adding a backend = one new module + one line in BACKENDS.
"""
from __future__ import annotations

from .base import DescribeRequest, Describer, DescriberError, DescriberStats, clean_answer
from .ollama import OllamaDescriber
from .openai import OpenAIDescriber
from .prompt import SupportExample, build_messages, load_template, make_support_example
from .rules import RulesDescriber

BACKENDS: dict[str, type] = {
    "rules": RulesDescriber,
    "openai": OpenAIDescriber,
    "ollama": OllamaDescriber,
}


def build_describer(cfg: dict, class_names: list[str], support: SupportExample | None = None) -> Describer:
    """The describer named by cfg["backend"] (default "rules")."""
    name = cfg.get("backend", "rules")
    if name not in BACKENDS:
        raise ValueError(f"unknown describer backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](cfg, class_names, support)


__all__ = [
    "BACKENDS", "DescribeRequest", "Describer", "DescriberError", "DescriberStats", "SupportExample",
    "build_describer", "build_messages", "clean_answer", "load_template", "make_support_example",
]
