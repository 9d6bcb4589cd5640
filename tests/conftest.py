from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.config import load

from .fake_openai import FakeOpenAI
from .servers import AiohttpServer, UvicornServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMNIMIND_COMPILE", "off")  # a minute of CPU per model: test_hf_compile asks


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeOpenAI]:
    upstream = FakeOpenAI()
    server = AiohttpServer(upstream.app())
    upstream.url = server.url  # type: ignore[attr-defined]
    yield upstream
    server.close()


@pytest.fixture(scope="session")
def fake_url(fake: FakeOpenAI) -> str:
    return str(fake.url)  # type: ignore[attr-defined]


GatewayFactory = Callable[[str], UvicornServer]


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted local weights go to a fresh folder, not the user's ~/.cache (hf_cache)."""
    folder = tmp_path_factory.mktemp("omnimind-cache")
    os.environ["OMNIMIND_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (tests/tiny_model.py)."""
    from .tiny_model import build_tiny_model  # imports torch: only for tests that ask

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """Start a real gateway (uvicorn on loopback) from a models.yaml text."""
    servers: list[UvicornServer] = []

    def start(yaml_text: str) -> UvicornServer:
        path = Path(tmp_path_factory.mktemp("cfg")) / "models.yaml"
        path.write_text(textwrap.dedent(yaml_text), encoding="utf-8")
        server = UvicornServer(create_app(load(path)))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
