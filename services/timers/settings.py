"""Settings of the timers service."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class TimersSettings(CommonSettings):
    timers_port: int = Field(default=8003, ge=1, le=65535)
