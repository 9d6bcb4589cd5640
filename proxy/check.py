"""`omnimind-proxy check`: is this config usable? Validate, resolve env, probe each provider.

Each provider module has one probe (providers.probe): it says whether the provider answers
and which models it has (None when it cannot list them), or raises. `describe()` turns
what it raised into a short reason a person can act on. The report is one line per alias
entry: OK, SKIP (not configured to run here: a key unset, torch missing) or FAIL
(configured but not usable: not running, key refused, model or weights missing), and why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import msgspec
import yaml

from . import providers, upstream
from .config import Config, Entry, ProviderConfig
from .errors import UpstreamError
from .providers import Probe

OK, SKIP, FAIL = "OK", "SKIP", "FAIL"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")
_LOCAL_HINT = "torch not installed (pip install 'omnimind-gateway[local]')"


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, UpstreamError) and exc.status:
        return exc.status
    found = _HTTP_STATUS.search(str(exc)) if isinstance(exc, UpstreamError) else None
    return int(found.group(1)) if found else None


def describe(exc: BaseException, base_url: str, connect_s: float) -> str:
    """What a probe's failure means, in a few words (not the connector's exception text)."""
    status = _http_status(exc)
    if status in (401, 403):
        return f"HTTP {status}: the api_key was refused at {base_url}"
    if status == 404:
        return f"HTTP 404 at {base_url} (is base_url right?)"
    if status is not None:
        return f"HTTP {status} from {base_url}"
    if isinstance(exc, upstream.ConnectError):
        if isinstance(exc.__cause__, socket.gaierror):
            return f"cannot resolve the host of {base_url}"
        if isinstance(exc.__cause__, ssl.SSLError | ssl.CertificateError):
            return f"TLS failed at {base_url}"
        return f"not running at {base_url}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {base_url} within {connect_s:g} s"
    if isinstance(exc, msgspec.DecodeError | msgspec.ValidationError):
        return f"{base_url} did not answer with a model list"
    if isinstance(exc, upstream.ProtocolError | ConnectionError):
        return f"connection to {base_url} failed ({type(exc).__name__})"
    text = exc.message if isinstance(exc, UpstreamError) else f"{type(exc).__name__}: {exc}"
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


@dataclass(frozen=True, slots=True)
class Outcome:
    """A provider as `check` sees it: OK / SKIP / FAIL, why, and its models (None: unknown)."""

    status: str
    detail: str
    models: set[str] | None = None


async def probe_all(config: Config) -> dict[str, Outcome]:
    unset = unset_variables(config.path)

    async def one(pc: ProviderConfig) -> Outcome:
        if pc.unavailable:
            return Outcome(SKIP, _unavailable(pc.unavailable, unset.get(pc.name, [])))
        if pc.type == "huggingface" and importlib.util.find_spec("torch") is None:
            return Outcome(SKIP, _LOCAL_HINT)
        try:
            probe: Probe = await providers.probe(pc)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            base_url = str(getattr(pc.spec, "base_url", pc.name))
            return Outcome(FAIL, describe(exc, base_url, pc.spec.connect_timeout))
        return Outcome(OK if probe.ok else FAIL, probe.detail, probe.models)

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


def verdict(config: Config, entry: Entry, seen: Outcome) -> tuple[str, str]:
    """(OK / SKIP / FAIL, reason) for one alias entry."""
    if seen.status != OK:
        return seen.status, seen.detail
    if config.providers[entry.provider].type == "huggingface":
        ok, detail = _local_weights(entry.model, entry.gguf_file)
        return (OK if ok else FAIL), detail
    if seen.models is not None and entry.model not in seen.models:
        return FAIL, f"model {entry.model} not found at the provider"
    return OK, seen.detail


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
