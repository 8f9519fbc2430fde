"""Reading a target's HMAC key when the gateway starts, from the environment or a file.

The key is held in a `Secret`, whose repr hides it, and never goes into a message:
an error names the variable or the file, never what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.notify import NotifyTarget
from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Secret:
    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(***)"


def load_secret(index: int, target: NotifyTarget, environ: Mapping[str, str]) -> Secret | None:
    """The target's key (None: it has none, as a Slack target may); ConfigError naming where it was looked for."""
    where = f"notify[{index}] ({target.name})"
    if target.secret_env:
        text = environ.get(target.secret_env, "")
        if not text.strip():
            raise ConfigError(
                f"{where}: secret_env: the environment variable {target.secret_env} is not set or empty: "
                "export the signing key there, or use secret_file"
            )
        return Secret(text.strip().encode())
    if target.secret_file is not None:
        try:
            data = target.secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: secret_file: cannot read {target.secret_file}: {exc.strerror}") from None
        if not data:
            raise ConfigError(f"{where}: secret_file: {target.secret_file} is empty: write the signing key in it")
        return Secret(data)
    return None
