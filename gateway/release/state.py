"""Release state per logical model, and the in-process table that holds it.

A release is what the data plane needs to route and mirror: the stable
version, an optional canary with its weight, and shadows with their mirror
fractions. Each change makes a new immutable state with the next revision;
readers take the current state with one dictionary lookup and never see a
half-made change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.config.spec import ModelSpec
from gateway.errors import FailedPrecondition, InvalidInput, ModelNotFound
from gateway.release.routing import Split
from gateway.release.rules import Rule, Target, check_rules
from gateway.types import BASIS_POINTS


@dataclass(frozen=True, slots=True)
class ReleaseState:
    model: str
    stable: str
    canary: str = ""
    canary_weight_bp: int = 0
    shadows: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # Fraction of canary requests also run on the stable version, so the
    # canary gets agreement figures like a shadow does.
    canary_compare_fraction: float = 0.0
    revision: int = 1
    # Routing rules, tried in order before the split (gateway.release.rules); () for most
    # models, so the request path tests one attribute.
    rules: tuple[Rule, ...] = ()

    @property
    def split(self) -> Split:
        return Split(self.stable, self.canary, self.canary_weight_bp)

    def role_of(self, version: str) -> str:
        if version == self.stable:
            return "stable"
        if version == self.canary:
            return "canary"
        if version in self.shadows:
            return "shadow"
        return "idle"

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "model": self.model,
            "stable": self.stable,
            "canary": self.canary,
            "canary_weight_bp": self.canary_weight_bp,
            "shadows": dict(self.shadows),
            "canary_compare_fraction": self.canary_compare_fraction,
            "revision": self.revision,
        }
        # Only when there are some: a release without rules is stored as before, so a
        # gateway that predates rules still reads it.
        if self.rules:
            data["rules"] = [rule.to_dict() for rule in self.rules]
        return data


def initial_state(model: str, spec: ModelSpec, versions: Iterable[str], default: str) -> ReleaseState:
    release = spec.release
    state = ReleaseState(
        model=model,
        stable=default,
        canary=release.canary,
        canary_weight_bp=release.canary_weight_bp if release.canary else 0,
        shadows=MappingProxyType(dict(release.shadows)),
        canary_compare_fraction=release.canary_compare_fraction,
    )
    check(state, set(versions))
    return state


def check(state: ReleaseState, versions: set[str]) -> None:
    """Refuse states that name versions that are not loaded or overlap roles."""
    named = [state.stable, *([state.canary] if state.canary else []), *state.shadows]
    for version in named:
        if version not in versions:
            raise ModelNotFound(
                f"model {state.model!r} has no loaded version {version!r} (loaded: {', '.join(sorted(versions))})"
            )
    if state.canary and state.canary == state.stable:
        raise FailedPrecondition(f"{state.model}: version {state.canary} is already the stable version")
    for version in state.shadows:
        if version in (state.stable, state.canary):
            raise FailedPrecondition(f"{state.model}: version {version} already serves traffic; it cannot shadow")
    if not 0 <= state.canary_weight_bp <= BASIS_POINTS:
        raise InvalidInput(f"canary weight must be 0..{BASIS_POINTS} basis points, got {state.canary_weight_bp}")
    for version, fraction in state.shadows.items():
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInput(f"mirror fraction of shadow {version} must be in 0..1, got {fraction}")
    check_rules(state.rules)
    for rule in state.rules:
        if rule.target is Target.VERSION and rule.version not in versions:
            raise InvalidInput(
                f"route {rule.name!r}: route.version {rule.version[:80]!r} is not a loaded version of "
                f"{state.model} (loaded: {', '.join(sorted(versions))}); route to stable, canary or a loaded version"
            )


class ReleaseTable:
    """The current release of every model. Changes go through `apply`."""

    def __init__(self, versions_of: Callable[[str], set[str]]) -> None:
        self._states: dict[str, ReleaseState] = {}
        self._versions_of = versions_of
        self._listeners: list[Callable[[ReleaseState], None]] = []

    def subscribe(self, listener: Callable[[ReleaseState], None]) -> None:
        self._listeners.append(listener)

    def install(self, state: ReleaseState) -> None:
        """Take a state as it is (at startup, or one read back from the store)."""
        check(state, self._versions_of(state.model))
        self._states[state.model] = state
        for listener in self._listeners:
            listener(state)

    def get(self, model: str) -> ReleaseState:
        state = self._states.get(model)
        if state is None:
            raise ModelNotFound(f"model {model[:80]!r} has no release")
        return state

    def models(self) -> list[str]:
        return sorted(self._states)

    def revision_of(self, model: str) -> int:
        state = self._states.get(model)
        return 0 if state is None else state.revision

    def remove(self, model: str) -> None:
        self._states.pop(model, None)

    def propose(self, model: str, **changes: object) -> ReleaseState:
        """The state `changes` would make (validated, next revision), without applying it."""
        return self.propose_from(self.get(model), **changes)

    def propose_from(self, current: ReleaseState, **changes: object) -> ReleaseState:
        """`propose` from a given state (one proposed before, in a change of several steps)."""
        model = current.model
        if "shadows" in changes:
            changes["shadows"] = MappingProxyType(dict(changes["shadows"]))  # type: ignore[call-overload]
        if changes.get("canary") == "":
            changes.setdefault("canary_weight_bp", 0)
        proposed = dataclasses.replace(current, revision=current.revision + 1, **changes)  # type: ignore[arg-type]
        check(proposed, self._versions_of(model))
        return proposed

    def apply(self, model: str, **changes: object) -> ReleaseState:
        proposed = self.propose(model, **changes)
        self.install(proposed)
        return proposed
