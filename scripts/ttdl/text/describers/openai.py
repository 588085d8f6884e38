"""Describer for any OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama /v1, hosted APIs).

base_url includes the API prefix, e.g. http://127.0.0.1:8000/v1; requests go to
{base_url}/chat/completions. Retries, concurrency and cleaning live in HttpDescriber.
"""
from __future__ import annotations

from typing import Any

from ttdl.text.describers.base import HttpDescriber


class OpenAIDescriber(HttpDescriber):
    backend = "openai"

    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def payload(self, messages: list[dict]) -> dict:
        return {
            "model": self.model,
            "messages": [self._wire(m) for m in messages],
            "temperature": self.temperature,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "stream": False,
        }

    def _wire(self, message: dict) -> dict:
        # Text-only turns go out as a plain string: some text-only chat templates reject content lists.
        if not message["images"]:
            return {"role": message["role"], "content": message["text"]}
        parts: list[dict] = [{"type": "text", "text": message["text"]}]
        parts += [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + self.image_base64(im)}}
                  for im in message["images"]]  # each view once, as PNG at the describer size
        return {"role": message["role"], "content": parts}

    def parse(self, body: Any) -> str | None:
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        if isinstance(content, list):  # some servers answer with content parts as well
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else None
