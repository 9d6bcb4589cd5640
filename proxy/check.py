"""`omnimind-proxy check`: is this config usable? Validate, resolve env, probe each provider.

Each provider type has one probe (by spec type, like the adapters); a probe says whether
the provider answers and which models it has, or None when it cannot list them.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

from . import providers
from .config import Config, ProviderConfig
from .providers import Probe


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
            return await providers.probe(pc)
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
            if ok and config.providers[e.provider].type == "huggingface":
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
