"""The round loop fedpipe owns: each round a sequence of stages on a Flower Grid.

Flower's `Strategy.start` sends one batch of messages per round and averages the list
of replies it gets back. fedpipe's loop keeps Flower's pieces (the Grid's push/pull, the
inner strategy's configure/aggregate, the ServerApp and ClientApp) but decides the rest:

1. identify: nodes not seen before say which client they are (`query.identify`), once;
2. sample: `fraction_train` of the identified clients, drawn from (seed, round)
   (`fedpipe.rounds.sampling`): the same clients in the same rounds on every run;
3. train: push to the sample, fold each reply into the aggregate as it arrives
   (`stage.run_stage` -> `CodecStrategy.receive_train`), never past the round timeout;
4. evaluate (if `fraction_evaluate` > 0) on a separately drawn sample;
5. centralized evaluation, the round's record, then the checkpoint (so a resumed run
   has no gap).

With secure aggregation (security.secagg=on), stage 3 is SecAgg's four stages
(`fedpipe.secagg.server`): advertise keys, share keys, masked input, unmask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedpipe.boundary import Rejection, decode_identity
from fedpipe.grid import NotEnoughNodes
from fedpipe.records import IDENTIFY
from fedpipe.rounds.sampling import NodeRegistry, sample_nodes, sample_size
from fedpipe.rounds.stage import run_stage

if TYPE_CHECKING:
    from fedpipe.strategy import CodecStrategy

__all__ = ["RoundEngine", "RoundPlan", "SampledGrid"]

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

# A node gets this long to say which client it is (a device starts its ClientApp for the
# first message); one that stays silent is asked again only after _RETRY rounds, so a
# stuck device costs one wait, not one per round.
_IDENTIFY_S = 60.0
_RETRY = 5


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part in a round, and how often the engine looks for replies."""

    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_nodes: int = 1
    seed: int = 0
    poll_s: float = 0.1
    wait_s: float = 300.0  # for min_nodes identified clients, before a round starts
    # Ask each new node which client it is (fedpipe's ClientApp answers). False: a node
    # is its own client id, as in Flower (an app whose ClientApp only trains and
    # evaluates, wrapped by fedpipe.flower.compress).
    identify: bool = True


class SampledGrid:
    """The Grid as the inner strategy sees it: only this round's sample, in draw order.

    The inner strategy (fraction 1) then configures exactly the sampled nodes; its own
    sampler (the global `random`) only permutes them, and fedpipe restores the order.
    """

    def __init__(self, grid: Grid, nodes: list[int], clients: Mapping[int, int]) -> None:
        self._grid, self._nodes = grid, nodes
        self.clients = {n: clients[n] for n in nodes}

    def get_node_ids(self) -> Iterator[int]:
        return iter(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class RoundEngine:
    """Runs a CodecStrategy's rounds on a Grid (see the module docstring)."""

    def __init__(self, strategy: CodecStrategy) -> None:
        self.strategy = strategy
        self.plan = strategy.plan
        self.registry = NodeRegistry()
        self._refused: set[int] = set()  # nodes whose identify reply was invalid
        self._silent: dict[int, int] = {}  # node -> round it last left identify unanswered

    # -- stages -------------------------------------------------------------------------

    def identify(
        self, grid: Grid, nodes: Iterable[int], server_round: int, deadline: float
    ) -> None:
        """Ask nodes not seen before which client they are (one small message each)."""
        if not self.plan.identify:
            for node in self.registry.unknown(nodes):
                self.registry.learn(node, node)
            return
        ask = [
            n
            for n in self.registry.unknown(nodes)
            if n not in self._refused and server_round - self._silent.get(n, -_RETRY) >= _RETRY
        ]
        if not ask:
            return
        deadline = min(deadline, time.monotonic() + _IDENTIFY_S)
        messages = [
            Message(RecordDict(), dst_node_id=n, message_type=IDENTIFY, group_id=str(server_round))
            for n in ask
        ]

        def learn(reply: Message) -> None:
            out = decode_identity(reply)
            node = reply.metadata.src_node_id
            if isinstance(out, Rejection):
                self._refused.add(node)
                log.warning("node %d not sampled: %s", node, out.reason)
            else:
                self.registry.learn(node, out)

        result = run_stage(grid, messages, learn, deadline, self.plan.poll_s)
        for node in result.silent:
            self._silent[node] = server_round
        if result.silent:
            log.warning(
                "%d node(s) did not say which client they are; asked again in %d rounds",
                len(result.silent),
                _RETRY,
            )

    def await_clients(self, grid: Grid, server_round: int) -> None:
        """Identify new nodes until min_nodes clients are known and connected; a bounded
        wait (wait_for_nodes), never Flower's endless one."""
        give_up = time.monotonic() + self.plan.wait_s
        while True:
            nodes = list(grid.get_node_ids())
            self.identify(grid, nodes, server_round, give_up)
            known = len(self.registry.connected(nodes))
            if known >= self.plan.min_nodes:
                return
            if time.monotonic() >= give_up:
                raise NotEnoughNodes(
                    f"only {known} of federation.min_nodes={self.plan.min_nodes} devices "
                    f"connected and identified after {self.plan.wait_s:.0f} s "
                    "(federation.wait_for_nodes); start more fedpipe-client devices or "
                    "lower federation.min_nodes"
                )
            time.sleep(self.plan.poll_s)

    def _sample(self, grid: Grid, server_round: int, fraction: float, purpose: str) -> SampledGrid:
        clients = self.registry.connected(grid.get_node_ids())
        size = sample_size(len(clients), fraction, self.plan.min_nodes)
        nodes = sample_nodes(clients, size, self.plan.seed, server_round, purpose)
        return SampledGrid(grid, nodes, clients)

    def train(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        deadline: float,
    ) -> ArrayRecord | None:
        """The training stage: the new global arrays, or None if nothing was aggregated."""
        s = self.strategy
        sampled = self._sample(grid, server_round, self.plan.fraction_train, "train")
        messages = list(s.configure_train(server_round, arrays, config, sampled))  # type: ignore[arg-type]
        if s.secagg is not None:  # the four SecAgg stages replace the training stage
            return s.secure_train(grid, server_round, messages, sampled.clients, deadline)

        def progress(done: int, sent: int) -> None:
            if s.on_progress is not None:
                s.on_progress(server_round, done, sent)

        run_stage(
            grid, messages, s.receive_train, deadline, self.plan.poll_s, progress, s.lost_train
        )
        new, _ = s.finish_train(server_round)
        return new

    def evaluate(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        deadline: float,
    ) -> MetricRecord | None:
        """Federated evaluation on a separately drawn sample (small replies: collected)."""
        s = self.strategy
        sampled = self._sample(grid, server_round, self.plan.fraction_evaluate, "evaluate")
        messages = list(s.configure_evaluate(server_round, arrays, config, sampled))  # type: ignore[arg-type]
        replies: list[Message] = []
        run_stage(grid, messages, replies.append, deadline, self.plan.poll_s)
        return s.aggregate_evaluate(server_round, replies)

    # -- the loop -----------------------------------------------------------------------

    def run(  # noqa: PLR0913 - mirrors Strategy.start
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        evaluate_fn: EvaluateFn | None,
    ) -> Result:
        s = self.strategy
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        first = s.round_offset + 1
        for server_round in range(first, first + num_rounds):
            self.await_clients(grid, server_round)
            deadline = time.monotonic() + timeout
            new = self.train(grid, server_round, arrays, train_config, deadline)
            if new is not None:
                arrays = new
            if self.plan.fraction_evaluate > 0:
                metrics = self.evaluate(grid, server_round, arrays, evaluate_config, deadline)
                if metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = metrics
            central = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
            s.finish_round(server_round, central)
            if s.checkpoint is not None:  # after the metrics line: no gap on resume
                s.checkpoint(server_round, arrays)
        result.arrays = arrays
        return result
