"""A memory cgroup to run a server in, as a container's memory limit would (root only): v2 where the
unified hierarchy has the memory controller, v1 otherwise."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A new memory cgroup of `limit` bytes. OSError where one cannot be made (not root, no memory
    controller); `remove()` when done (its processes must have exited)."""

    def __init__(self, limit: int, prefix: str = "vae") -> None:
        controllers = ROOT / "cgroup.controllers"
        self.v2 = controllers.exists() and "memory" in controllers.read_text().split()
        self.path = (ROOT if self.v2 else ROOT / "memory") / f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        try:
            (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        except OSError:
            self.remove()
            raise

    @property
    def launcher(self) -> tuple[str, ...]:
        """A command prefix that runs the rest of the command inside the cgroup."""
        return ("sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh")

    def enter(self) -> None:
        """Move the calling process in: a subprocess's preexec_fn, before it runs anything."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        """Processes of the cgroup the kernel killed for memory (Linux 4.13+ on v1)."""
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return int(dict(line.split() for line in text.splitlines()).get("oom_kill", 0))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass
