"""`per-model`: one function per model, no packing (the first baseline).

Each model gets its own function `f"{function}--{model}"`, scaled like one OpenWhisk action:
reuse an instance of that function with a free slot (least loaded first), else start one more
(up to `max_instances`), else queue on the least loaded. Instances stop after the platform's
fixed idle timeout.
"""

from __future__ import annotations

from veil.packer.policies.base import Policy
from veil.packer.state import Decision


def function_for(template: str, model: str) -> str:
    """The per-model function name (fixed by docs/CONTRACTS.md's Packer section)."""
    return f"{template}--{model}"


class PerModelPolicy(Policy):
    """One function per model; instances never hold another model."""

    name = "per-model"

    def route(self, model: str, now: float) -> Decision:
        function = function_for(self.spec.function, model)
        mine = sorted(
            (i for i in self.instances.values() if i.function == function),
            key=lambda i: (i.total_inflight, i.seq),
        )
        free = [i for i in mine if i.total_inflight < i.capacity]
        if free:
            return self._admit(free[0], model, now)
        if len(mine) < self.spec.max_instances:
            inst = self._new_instance(function, now, prefix="m")
            return self._admit(inst, model, now, start=True)
        return self._admit(mine[0], model, now)
