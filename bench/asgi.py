"""The gateway as an ASGI factory for other servers (granian), config from $OMNIMIND_CONFIG.

OMNIMIND_CONFIG=models.yaml granian --interface asgi --factory bench.asgi:app
"""

from __future__ import annotations

import os
from typing import Any

from proxy.app import create_app
from proxy.config import load


def app() -> Any:
    return create_app(load(os.environ["OMNIMIND_CONFIG"]))
