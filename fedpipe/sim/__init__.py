"""Virtual clients for simulation: cohort workers behind a Flower Grid.

`CohortGrid` is the Grid the ServerApp runs on; `RayPool` runs `CohortWorker` actors on
a local Ray or an existing cluster, `InProcessPool` one worker inside the driver.
"""

from __future__ import annotations

from fedpipe.sim.grid import CohortGrid, InProcessPool, RayPool, WorkerPool
from fedpipe.sim.worker import CohortWorker, client_of_node, node_of_client

__all__ = [
    "CohortGrid",
    "CohortWorker",
    "InProcessPool",
    "RayPool",
    "WorkerPool",
    "client_of_node",
    "node_of_client",
]
