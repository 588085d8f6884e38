"""Describer for Ollama's native chat API (POST {base_url}/api/chat, non-streaming).

Preferred over Ollama's /v1 route because only the native API takes num_ctx and
keep_alive: a too-small default context silently truncates the two-image prompt,
and an unloaded model costs a reload on every step.
"""
from __future__ import annotations

from typing import Any

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.base import HttpDescriber
from ttdl.text.describers.prompt import SupportExample


class OllamaDescriber(HttpDescriber):
    backend = "ollama"

    def __init__(self, cfg: DescriberSettings, class_names: list[str], support: SupportExample | None = None,
                 template: dict | None = None):
        super().__init__(cfg, class_names, support, template)
        self.keep_alive = cfg.keep_alive
        self.num_ctx = cfg.num_ctx

    def url(self) -> str:
        return f"{self.base_url}/api/chat"

    def payload(self, messages: list[dict]) -> dict:
        wire = []
        for m in messages:
            msg = {"role": m["role"], "content": m["text"]}
            if m["images"]:
                msg["images"] = [self.image_base64(im) for im in m["images"]]  # PNG at the describer size
            wire.append(msg)
        return {
            "model": self.model,
            "messages": wire,
            "stream": False,
            "keep_alive": self.keep_alive,
            "options": {
                "temperature": self.temperature,
                "seed": self.seed,
                "num_ctx": self.num_ctx,
                "num_predict": self.max_tokens,
            },
        }

    def parse(self, body: Any) -> str | None:
        try:
            content = body["message"]["content"]
        except (KeyError, TypeError):
            return None
        return content if isinstance(content, str) else None
