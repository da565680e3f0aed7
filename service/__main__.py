"""`python -m service --model-repo models --port 50051 --metrics-port 9090`"""

from __future__ import annotations

import asyncio
import logging
import sys

from service.config import ConfigError, parse_config
from service.memory import tune_allocator
from service.repository import RepositoryError
from service.runtime import ModelLoadError
from service.server import serve


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # before the server starts its threads
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
