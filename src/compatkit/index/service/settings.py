"""Start-up settings of the HTTP service (one frozen object passed to ``create_app``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from compatkit.config_base import StrictModel

#: Shortest admin token accepted; a short token is a guessable token.
MIN_TOKEN_LENGTH = 16


class ServiceSettings(StrictModel):
    """How the service runs.

    Args:
        admin_token: bearer token required by every write and admin endpoint.
        max_body_bytes: larger request bodies are refused with 413. Default 8 MiB.
        source_root: when set, item sources must be relative paths or paths inside it.
        run_worker: run upgrade batches in a background thread. Default True.
        worker_name: the claim name of that worker (a restarted service resumes its batch).
        worker_poll_s: how often the idle worker looks for running jobs.
    """

    admin_token: SecretStr
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    source_root: Path | None = None
    run_worker: bool = True
    worker_name: str = "service"
    worker_poll_s: float = Field(0.5, gt=0)

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value()
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip():
            raise ValueError(f"admin_token must be at least {MIN_TOKEN_LENGTH} characters "
                             "without surrounding spaces")
        return value
