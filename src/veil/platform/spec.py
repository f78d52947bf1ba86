"""What a deployed function is: the command of one instance plus its scaling and billing knobs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from veil.platform.errors import PlatformError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


@dataclass
class FunctionSpec:
    """One function, as an OpenWhisk action would be declared.

    - `command`: argv of one instance; the instance reads its port from env `VEIL_PORT` and
      speaks the OpenWhisk action protocol (`POST /init`, `POST /run`).
    - `init_value`: sent once as `{"value": init_value}` to `POST /init`.
    - `memory_mb`: the memory limit used for GB-second billing (and reported per instance).
    - `concurrency`: requests in flight per instance (OpenWhisk's intra-container concurrency).
    - `min_instances` / `max_instances`: bounds on live instances (min 0 = scale to zero).
    - `idle_timeout_s`: keep-alive of an idle instance before it is stopped.
    - `max_queue`: requests waiting for a slot; beyond that an invoke fails fast with "busy".
    - `env`: extra environment for instances (on top of the platform's own and `__OW_*`).
    - `start_timeout_s`: how long a cold start (spawn until `/init` answered) may take.
    - `namespace`: the OpenWhisk namespace exported as `__OW_NAMESPACE`.
    - `prewarm`: size of the warm pool: instances kept started and initialised (for the Veil
      runtime: imported, measured and attested, holding no model and no key) that take no
      request until a cold start takes one; the pool refills in the background. Their idle
      time is billed separately (`prewarm_gb_seconds`). They do not count in `max_instances`.
    - `fork_template`: start instances by forking a pre-imported template process (the
      command run with `VEIL_FORK_SERVER` set; `python -m veil.runtime` is one) instead of a
      new interpreter each; each instance still initialises (attests, makes its keys) itself.
    """

    name: str
    command: list[str]
    init_value: dict = field(default_factory=dict)
    memory_mb: int = 512
    concurrency: int = 4
    max_instances: int = 4
    min_instances: int = 0
    idle_timeout_s: float = 60.0
    max_queue: int = 64
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 30.0
    namespace: str = "guest"
    prewarm: int = 0
    fork_template: bool = False

    def validate(self) -> None:
        """Refuse specs that could never run, naming the field and why."""

        def bad(what: str) -> PlatformError:
            return PlatformError("bad_spec", f"function {self.name!r}: {what}")

        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise bad("name must be 1-128 characters of letters, digits, '_', '.', '@', '-'")
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise bad("command must be a non-empty list of strings")
        if self.memory_mb <= 0:
            raise bad(f"memory_mb must be > 0 (got {self.memory_mb})")
        if self.concurrency < 1:
            raise bad(f"concurrency must be >= 1 (got {self.concurrency})")
        if self.max_instances < 1:
            raise bad(f"max_instances must be >= 1 (got {self.max_instances})")
        if not 0 <= self.min_instances <= self.max_instances:
            raise bad(f"min_instances must be in [0, max_instances] (got {self.min_instances})")
        if self.idle_timeout_s < 0:
            raise bad(f"idle_timeout_s must be >= 0 (got {self.idle_timeout_s})")
        if self.max_queue < 0:
            raise bad(f"max_queue must be >= 0 (got {self.max_queue})")
        if self.start_timeout_s <= 0:
            raise bad(f"start_timeout_s must be > 0 (got {self.start_timeout_s})")
        if not isinstance(self.prewarm, int) or isinstance(self.prewarm, bool) or not 0 <= self.prewarm <= 64:
            raise bad(f"prewarm must be an integer in [0, 64] (got {self.prewarm!r})")
        if not isinstance(self.fork_template, bool):
            raise bad(f"fork_template must be true or false (got {self.fork_template!r})")
        if not isinstance(self.init_value, dict):
            raise bad("init_value must be a JSON object (dict)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise bad("env must map strings to strings")

    def instance_identity(self) -> tuple:
        """Fields that define what an instance *is*; changing them on re-deploy drains instances."""
        return (
            tuple(self.command),
            json.dumps(self.init_value, sort_keys=True, default=str),
            tuple(sorted(self.env.items())),
            self.memory_mb,
            self.namespace,
            self.name,
        )
