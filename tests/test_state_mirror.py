"""The bridge between local breakers and published cooldowns (pure, on a fake clock)."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.state import Cooldown, HealthEvent
from proxy.state.mirror import Mirror, health_ids


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


@dataclass
class FakeBreaker:
    cool_until: float = 0.0
    open_until: float = 0.0
    clock: Clock = CLOCK


@dataclass
class FakeProvider:
    host: FakeBreaker = field(default_factory=FakeBreaker)
    models: dict[str, FakeBreaker] = field(default_factory=dict)

    def deployment(self, model: str) -> FakeBreaker:
        return self.models.setdefault(model, FakeBreaker())


CHAIN = [("up", "gpt"), ("up", "mini"), ("local", "smol")]


def test_ids_name_deployments_and_providers_once() -> None:
    assert health_ids(CHAIN) == ["up/gpt", "up", "up/mini", "local/smol", "local"]


def test_published_cooldowns_reach_the_local_breakers() -> None:
    providers = {"up": FakeProvider(), "local": FakeProvider()}
    mirror = Mirror(providers, CHAIN)
    assert mirror.ids == health_ids(CHAIN)
    mirror.absorb({
        "up/gpt": Cooldown("cooling_down", 30), "local": Cooldown("circuit_open", 5),
        "elsewhere/x": Cooldown("cooling_down", 9),
    })  # fmt: skip
    assert providers["up"].deployment("gpt").cool_until == 130
    assert providers["local"].host.open_until == 105
    assert mirror.events() == []  # nothing new to publish: it came from the store


def test_what_a_request_changed_is_published() -> None:
    providers = {"up": FakeProvider(), "local": FakeProvider()}
    providers["local"].host.open_until = 90.0  # ejected before, half-open now
    mirror = Mirror(providers, CHAIN)
    mirror.absorb({})
    providers["up"].deployment("gpt").cool_until = 160.0  # a 429 with Retry-After: 60
    providers["up"].host.open_until = 110.0  # ejected
    providers["local"].host.open_until = 0.0  # the probe succeeded
    assert mirror.events() == [
        HealthEvent("up/gpt", "cooling_down", 60.0),
        HealthEvent("up", "circuit_open", 10.0),
        HealthEvent("local", "closed", 0.0),
    ]
