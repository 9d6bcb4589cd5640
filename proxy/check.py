"""`omnimind-proxy check`: is this config usable? Validate, resolve env, probe each provider.

Each provider type has one probe (by spec type, like the adapters); a probe says whether
the provider answers and which models it has (None when it cannot list them), or raises.
`describe()` turns what it raised into a short reason a person can act on. The report is
one line per alias entry: OK, SKIP (not configured to run: a key unset, torch missing)
or FAIL (configured but not usable), and why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml

from .config import Config, Entry, HuggingFaceSpec, OllamaSpec, OpenAISpec, ProviderConfig

OK, SKIP, FAIL = "OK", "SKIP", "FAIL"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_LOCAL_HINT = "torch not installed (pip install 'omnimind-gateway[local]')"


@dataclass(slots=True)
class Probe:
    ok: bool
    detail: str
    models: set[str] | None = None  # None: cannot tell which models it has
    status: str = ""  # OK / SKIP / FAIL; empty: OK when ok, else FAIL


class ProbeHTTPError(Exception):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status, self.url = status, url


class _Listing(msgspec.Struct):
    """GET /models (OpenAI: `data`) or /api/tags (Ollama: `models`): the ids or names."""

    data: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []


_listing = msgspec.json.Decoder(_Listing)


async def _get_json(url: str, headers: dict[str, str], connect_s: float) -> _Listing:
    client_timeout = aiohttp.ClientTimeout(total=connect_s + 5, sock_connect=connect_s)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.get(url, headers=headers, allow_redirects=False) as resp,
    ):
        if resp.status != 200:
            raise ProbeHTTPError(resp.status, url)
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
    if importlib.util.find_spec("torch") is None:
        return Probe(False, _LOCAL_HINT, status=SKIP)
    return Probe(True, "local", None)  # checked per entry: see _local_weights


_PROBES: dict[type, Callable[[ProviderConfig], Awaitable[Probe]]] = {
    OpenAISpec: _probe_openai,
    OllamaSpec: _probe_ollama,
    HuggingFaceSpec: _probe_huggingface,
}


def describe(exc: BaseException, base_url: str, connect_s: float) -> str:
    """What a probe's failure means, in a few words (not the connector's exception text)."""
    if isinstance(exc, ProbeHTTPError):
        if exc.status in (401, 403):
            return f"HTTP {exc.status}: the api_key was refused at {base_url}"
        if exc.status == 404:
            return f"HTTP 404 at {exc.url} (is base_url right?)"
        return f"HTTP {exc.status} from {exc.url}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve the host of {base_url}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"TLS failed at {base_url}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"not running at {base_url}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {base_url} within {connect_s:g} s"
    if isinstance(exc, msgspec.DecodeError | msgspec.ValidationError):
        return f"{base_url} did not answer with a model list"
    if isinstance(exc, aiohttp.ClientError):
        return f"connection to {base_url} failed ({type(exc).__name__})"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 100 else text[:97] + "..."


def unset_variables(path: str) -> dict[str, list[str]]:
    """Per provider, the ${VAR} / ${VAR:-} its settings name that resolve to nothing."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        providers = raw["providers"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    found: dict[str, list[str]] = {}
    for name, settings in providers.items() if isinstance(providers, dict) else ():
        names = []
        for match in _VAR.finditer(yaml.safe_dump(settings)):
            var, default = match.group(1), match.group(2)
            if not os.environ.get(var) and not default:
                names.append(var)
        if names:
            found[str(name)] = list(dict.fromkeys(names))
    return found


def _unavailable(reason: str, unset: list[str]) -> str:
    if unset:
        return f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set"
    return reason


async def probe_all(config: Config) -> dict[str, Probe]:
    unset = unset_variables(config.path)

    async def one(pc: ProviderConfig) -> Probe:
        if pc.unavailable:
            return Probe(False, _unavailable(pc.unavailable, unset.get(pc.name, [])), status=SKIP)
        try:
            return await _PROBES[type(pc.spec)](pc)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            base_url = str(getattr(pc.spec, "base_url", pc.name))
            return Probe(False, describe(exc, base_url, pc.spec.connect_timeout))

    names = list(config.providers)
    results = await asyncio.gather(*(one(config.providers[n]) for n in names))
    return dict(zip(names, results, strict=True))


def _local_weights(model: str, gguf_file: str | None) -> tuple[bool, str]:
    if model.startswith("package:"):
        spec = importlib.util.find_spec(model.removeprefix("package:"))
        if spec is None or not spec.submodule_search_locations:
            return False, f"package {model.removeprefix('package:')} is not installed"
        folder = Path(next(iter(spec.submodule_search_locations)))
    elif model.startswith(("/", ".", "~")):
        folder = Path(model).expanduser()
    else:
        return True, "hub model (downloaded on first use)"
    target = folder / gguf_file if gguf_file else folder
    return (True, "files present") if target.exists() else (False, f"missing {target}")


def verdict(config: Config, entry: Entry, probe: Probe) -> tuple[str, str]:
    """(OK / SKIP / FAIL, reason) for one alias entry."""
    if not probe.ok:
        return probe.status or FAIL, probe.detail
    if isinstance(config.providers[entry.provider].spec, HuggingFaceSpec):
        ok, detail = _local_weights(entry.model, entry.gguf_file)
        return (OK if ok else FAIL), detail
    if probe.models is not None and entry.model not in probe.models:
        return FAIL, f"model {entry.model} not found at the provider"
    return OK, probe.detail


def run_check(config: Config) -> int:
    """Print one line per alias entry; 0 if every alias has at least one OK entry."""
    print(f"config {config.path}: valid")
    probes = asyncio.run(probe_all(config))
    rows: list[tuple[str, str, str, str]] = []
    usable_aliases = 0
    for alias, entries in config.models.items():
        usable = False
        for e in entries:
            status, reason = verdict(config, e, probes[e.provider])
            usable |= status == OK
            rows.append((status, alias, f"{e.provider}/{e.model}", reason))
        usable_aliases += usable
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    total = len(config.models)
    print(f"{usable_aliases}/{total} aliases have at least one OK entry")
    return 0 if usable_aliases == total else 1
