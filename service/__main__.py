"""`python -m service --model-repo models --port 50051 --metrics-port 9090`"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys

from service.config import ConfigError, parse_config
from service.repository import RepositoryError
from service.runtime import ModelLoadError
from service.server import serve


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates an arena of its own and keeps what each has held, and
    the server has several such threads (the event loop, a worker per graph, Score's arithmetic):
    two arenas hold resident memory down under load. Called before the server starts its threads,
    unless the environment already sets MALLOC_ARENA_MAX; a libc other than glibc is left alone."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_ARENA_MAX = -8  # malloc.h
    libc.mallopt(M_ARENA_MAX, arenas)


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger(__name__).info("config: %s", config.to_log())
    try:
        asyncio.run(serve(config))
    except (RepositoryError, ModelLoadError, ConfigError) as err:
        logging.getLogger(__name__).error("cannot serve: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
