"""Settings of the reward service; its __main__ fills the token in from auth.generation_token."""

from __future__ import annotations

import os

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from e3.verify.pool import DEFAULT_MAX_RESPONSE_CHARS
from services.common.limits import MAX_REWARD_BODY_BYTES


class RewardSettings(BaseModel):
    """`timeout_s` bounds each verification; `workers` is the number of checker
    processes (each check holds one); `max_batch` bounds items per request, `max_body_bytes` a request's body;
    `python_path` lists the directories python: reward functions are imported
    from (e3.verify.python_reward; empty: python: names score 0, saying why)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8200, ge=0, le=65535)
    timeout_s: float = Field(2.0, gt=0)
    workers: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1), ge=1)
    max_batch: int = Field(4096, ge=1)
    max_body_bytes: int = Field(MAX_REWARD_BODY_BYTES, ge=1)
    max_response_chars: int = Field(DEFAULT_MAX_RESPONSE_CHARS, ge=1)
    # The generation token (E3_GENERATION_TOKEN): scoring is the replicas' call. None: open
    # (services.reward.__main__ allows that only with auth.insecure_loopback on loopback).
    api_token: str | None = Field(None, repr=False)
    python_path: tuple[str, ...] = ()

    @field_validator("python_path")
    @classmethod
    def _directories(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        missing = [p for p in value if not Path(p).is_dir()]
        if missing:
            raise ValueError(f"python_path entries are not directories: {missing}")
        return tuple(str(Path(p).resolve()) for p in value)
