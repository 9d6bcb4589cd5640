"""Re-extract the OpenAI schemas the tests validate against into tests/openai_schemas/.

OpenAI publishes its API as one OpenAPI document (MIT-licensed, github.com/openai/openai-openapi).
The tests need only a few response shapes, so we keep the closure of those schemas under
`components` ($refs to `#/components/...` resolve unchanged) and the spec's license beside it.

    python scripts/extract_openai_schemas.py path/to/openai-openapi.yaml [path/to/LICENSE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
    "CreateEmbeddingResponse",
    "CreateCompletionResponse",
    "Response",
    "ResponseStreamEvent",
    "ListModelsResponse",
)
OUT_DIR = Path(__file__).resolve().parents[1] / "tests" / "openai_schemas"
PREFIX = "#/components/"


def _refs(node: Any) -> set[tuple[str, str]]:
    """Every (section, name) that `node` points at with a `#/components/<section>/<name>` $ref."""
    found: set[tuple[str, str]] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith(PREFIX):
                section, _, name = ref[len(PREFIX) :].partition("/")
                found.add((section, name.split("/", 1)[0]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def closure(components: dict[str, Any], roots: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The named schemas and everything they reference, grouped by components section."""
    kept: dict[str, dict[str, Any]] = {}
    todo = [("schemas", name) for name in roots if name in components["schemas"]]
    while todo:
        section, name = todo.pop()
        if name in kept.setdefault(section, {}):
            continue
        node = components[section][name]
        kept[section][name] = node
        todo.extend(_refs(node))
    return {section: dict(sorted(nodes.items())) for section, nodes in sorted(kept.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="openai-openapi.yaml")
    parser.add_argument("license", type=Path, nargs="?", help="the spec's LICENSE file")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with args.spec.open(encoding="utf-8") as f:
        spec = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    missing = [name for name in ROOTS if name not in spec["components"]["schemas"]]
    if missing:
        print(f"not in this spec (skipped): {', '.join(missing)}", file=sys.stderr)
    doc = {
        "source": "https://github.com/openai/openai-openapi (MIT, see LICENSE)",
        "openapi": spec.get("openapi"),
        "version": spec.get("info", {}).get("version"),
        "roots": [name for name in ROOTS if name not in missing],
        "components": closure(spec["components"], ROOTS),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "openai-schemas.json"
    target.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    if args.license is not None:
        shutil.copyfile(args.license, args.out / "LICENSE")
    count = sum(len(nodes) for nodes in doc["components"].values())
    print(f"wrote {target} ({count} schemas)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
