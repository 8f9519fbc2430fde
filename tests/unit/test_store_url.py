"""The state database's URL as messages and logs show it: never with a password."""

from __future__ import annotations

import pytest

from gateway.release.store.postgres import redacted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://gw:s3cret@db:5432/gateway", "postgresql://gw:***@db:5432/gateway"),
        # libpq also reads the password from the query: it was printed whole in every error.
        ("postgresql://gw@db/gateway?password=s3cret", "postgresql://gw@db/gateway?password=***"),
        (
            "postgresql://gw@db/gateway?sslmode=require&PassWord=s3cret&sslpassword=k3y",
            "postgresql://gw@db/gateway?sslmode=require&PassWord=***&sslpassword=***",
        ),
        ("postgresql://gw@db/gateway?sslmode=require", "postgresql://gw@db/gateway?sslmode=require"),
    ],
)
def test_a_password_never_shows(url: str, shown: str) -> None:
    assert redacted(url) == shown
    assert "s3cret" not in redacted(url) and "k3y" not in redacted(url)
