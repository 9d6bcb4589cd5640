"""`omnimind-proxy check`: is this config usable? Validate, resolve env, probe each provider.

Each provider type has one probe (by spec type, like the adapters); a probe says whether
the provider answers and which models it has, or None when it cannot list them.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from .config import Config, HuggingFaceSpec, OllamaSpec, OpenAISpec, ProviderConfig


@dataclass(slots=True)
class Probe:
    ok: bool
    detail: str
    models: set[str] | None = None  # None: cannot tell which models it has


class _Listing(msgspec.Struct):
    """GET /models (OpenAI: `data`) or /api/tags (Ollama: `models`): the ids or names."""

    data: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []


_listing = msgspec.json.Decoder(_Listing)


async def _get_json(url: str, headers: dict[str, str], connect_s: float) -> _Listing:
    client_timeout = aiohttp.ClientTimeout(total=connect_s + 5, sock_connect=connect_s)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.get(url, headers=headers) as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        return _listing.decode(await resp.read())


async def _probe_openai(pc: ProviderConfig) -> Probe:
    spec = pc.spec
    assert isinstance(spec, OpenAISpec)
    headers = dict(pc.headers)
    if pc.api_key:
        headers["Authorization"] = f"Bearer {pc.api_key.reveal()}"
    body = await _get_json(f"{spec.base_url}/models", headers, spec.connect_timeout)
    return Probe(True, "reachable", {str(m.get("id")) for m in body.data})


async def _probe_ollama(pc: ProviderConfig) -> Probe:
    spec = pc.spec
    assert isinstance(spec, OllamaSpec)
    body = await _get_json(f"{spec.base_url}/api/tags", dict(pc.headers), spec.connect_timeout)
    names = {str(m.get("name")) for m in body.models}
    # "qwen2:7b-instruct" may be asked for as "qwen2:7b-instruct" or "qwen2" (= ":latest")
    names |= {n.removesuffix(":latest") for n in names}
    return Probe(True, "reachable", names)


async def _probe_huggingface(pc: ProviderConfig) -> Probe:
    return Probe(True, "local", None)  # checked per entry: see _local_weights


_PROBES: dict[type, Callable[[ProviderConfig], Awaitable[Probe]]] = {
    OpenAISpec: _probe_openai,
    OllamaSpec: _probe_ollama,
    HuggingFaceSpec: _probe_huggingface,
}


def _local_weights(model: str, gguf_file: str | None) -> tuple[bool, str]:
    if model.startswith("package:"):
        spec = importlib.util.find_spec(model.removeprefix("package:"))
        if spec is None or not spec.submodule_search_locations:
            return False, "package not installed"
        folder = Path(next(iter(spec.submodule_search_locations)))
    elif model.startswith(("/", ".", "~")):
        folder = Path(model).expanduser()
    else:
        return True, "hub model (downloaded on first use)"
    target = folder / gguf_file if gguf_file else folder
    return (True, "files present") if target.exists() else (False, f"missing {target}")


async def probe_all(config: Config) -> dict[str, Probe]:
    async def one(pc: ProviderConfig) -> Probe:
        if pc.unavailable:
            return Probe(False, f"unavailable: {pc.unavailable}")
        try:
            return await _PROBES[type(pc.spec)](pc)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return Probe(False, f"unreachable: {type(exc).__name__} {exc}".strip())

    names = list(config.providers)
    results = await asyncio.gather(*(one(config.providers[n]) for n in names))
    return dict(zip(names, results, strict=True))


def run_check(config: Config) -> int:
    """Print a table of every alias entry and whether it can serve; 0 if every alias can."""
    print(f"config: {config.path}: valid")
    if config.missing_env:
        print("environment variables not set: " + ", ".join(config.missing_env))
    probes = asyncio.run(probe_all(config))
    rows = [("alias", "provider", "model", "status")]
    usable_aliases = 0
    for alias, entries in config.models.items():
        usable = False
        for e in entries:
            probe = probes[e.provider]
            ok, detail = probe.ok, probe.detail
            if ok and isinstance(config.providers[e.provider].spec, HuggingFaceSpec):
                ok, detail = _local_weights(e.model, e.gguf_file)
            elif ok and probe.models is not None and e.model not in probe.models:
                ok, detail = False, "model not found at the provider"
            usable |= ok
            rows.append((alias, e.provider, e.model, ("ok: " if ok else "FAIL: ") + detail))
        usable_aliases += usable
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    total = len(config.models)
    print(f"{usable_aliases}/{total} aliases have at least one usable entry")
    return 0 if usable_aliases == total else 1
