"""Entry-point helper: run a service's ASGI app with uvicorn (uvloop, httptools) from settings."""

from __future__ import annotations

import os
import socket
from typing import Any

import uvicorn

from services.common.logs import configure_logging
from services.common.settings import CommonSettings


def instance_name(settings: CommonSettings) -> str:
    return settings.instance or f"{socket.gethostname()}-{os.getpid()}"


def serve(
    app: Any, settings: CommonSettings, *, service: str, port: int, **uvicorn_options: Any
) -> None:
    configure_logging(service, instance_name(settings), settings.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        lifespan="on",
        **uvicorn_options,
    )
