"""Expert placement of a sharded MoE (pure arithmetic, no I/O): which expert-parallel rank and node
hold each expert, and which node writes it.

Placement follows DeepSpeed: expert-parallel groups are consecutive global ranks,
g = node * gpus_per_node + local, ep_rank = g % P, and ep_rank p holds experts [p*E/P, (p+1)*E/P).

Legend: E experts, P expert-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_placement(num_experts: int, ep_size: int, nodes: int, gpus_per_node: int) -> None:
    """ValueError (one line, with the fix) unless E experts can be split over P ranks of nodes x gpus_per_node."""
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: a MoE layer needs at least one expert")
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: use the number of nodes of the job (>= 1)")
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {gpus_per_node}: use the GPUs (ranks) per node (>= 1)")
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(
            f"--ep {ep_size} does not divide the {num_experts} experts per layer; "
            f"use an expert-parallel size in: {_divisors(num_experts)}"
        )
    world = nodes * gpus_per_node
    if world % ep_size:
        raise ValueError(
            f"--ep {ep_size} does not divide the {world} ranks (--nodes {nodes} x --gpus-per-node "
            f"{gpus_per_node}); use an expert-parallel size in: {_divisors(world)}"
        )


def check_ep_size(ep_size: int, world: int, num_experts: int, where: str = "parallel.ep_size") -> None:
    """ValueError (one line, with the fix) unless P divides both the world size and the experts per layer."""
    if ep_size < 1 or world % ep_size:
        raise ValueError(
            f"{where}={ep_size} with {world} rank(s): the expert-parallel size must divide the world size; "
            f"launch a multiple of {ep_size} ranks or set parallel.ep_size to a divisor of {world}"
        )
    if num_experts % ep_size:
        raise ValueError(
            f"{where}={ep_size} with {num_experts} experts per layer: every rank must hold the same number "
            f"of experts; use a divisor of {num_experts}"
        )


def largest_ep_size(ceiling: int, world: int, num_experts: int) -> int:
    """The largest P <= ceiling that divides both the world size and the experts per layer (1 always does)."""
    return max(p for p in range(1, max(1, ceiling) + 1) if world % p == 0 and num_experts % p == 0)


def check_node(node: int, nodes: int) -> None:
    if not 0 <= node < nodes:
        raise ValueError(
            f"--node-rank {node} is outside [0, {nodes}) for --nodes {nodes}; pass this node's id"
        )


def experts_of_ep_rank(num_experts: int, ep_size: int, ep_rank: int) -> list[int]:
    """Experts held by expert-parallel rank `ep_rank`: the contiguous block [p*E/P, (p+1)*E/P)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide num_experts={num_experts}; "
            f"use an expert-parallel size in: {_divisors(num_experts)}"
        )
    if not 0 <= ep_rank < ep_size:
        raise ValueError(
            f"ep_rank={ep_rank} is outside [0, {ep_size}); use a rank of the expert-parallel group"
        )
    per = num_experts // ep_size
    return list(range(ep_rank * per, (ep_rank + 1) * per))


def experts_of_node(num_experts: int, ep_size: int, node: int, gpus_per_node: int) -> list[int]:
    """Experts held by any rank of `node` (sorted): the union over its global ranks."""
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {gpus_per_node}: use the GPUs (ranks) per node (>= 1)")
    if node < 0:
        raise ValueError(f"--node-rank {node}: use a node id >= 0")
    held: set[int] = set()
    for g in range(node * gpus_per_node, (node + 1) * gpus_per_node):
        held.update(experts_of_ep_rank(num_experts, ep_size, g % ep_size))
    return sorted(held)


def writers(num_experts: int, ep_size: int, nodes: int, gpus_per_node: int) -> dict[int, int]:
    """expert -> the one node that writes it: among the nodes holding e (sorted), index e % count."""
    check_placement(num_experts, ep_size, nodes, gpus_per_node)
    holders: dict[int, list[int]] = {e: [] for e in range(num_experts)}
    for n in range(nodes):
        for e in experts_of_node(num_experts, ep_size, n, gpus_per_node):
            holders[e].append(n)
    return {e: hs[e % len(hs)] for e, hs in holders.items()}


def shard_writer(expert: int, num_experts: int, ep_size: int, nodes: int, gpus_per_node: int) -> int:
    """The node that writes `expert` (one of the nodes whose ranks hold it; spreads work over them)."""
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert {expert} is outside [0, {num_experts})")
    return writers(num_experts, ep_size, nodes, gpus_per_node)[expert]


def experts_written_by(
    node: int, num_experts: int, ep_size: int, nodes: int, gpus_per_node: int
) -> list[int]:
    """The experts `node` writes (sorted; may be empty when other nodes hold the same experts)."""
    check_node(node, nodes)
    return [e for e, n in writers(num_experts, ep_size, nodes, gpus_per_node).items() if n == node]


@dataclass(frozen=True)
class NodePlacement:
    """Where one reconstruct task runs in the training job whose expert-parallel layout it writes for."""

    node: int
    """This node's id in [0, nodes) (SLURM_NODEID)."""
    nodes: int
    """Nodes of the training job (SLURM_NNODES)."""
    gpus_per_node: int
    """Ranks per node."""
    ep_size: int
    """P: expert-parallel size of the training job (divides the experts and nodes * gpus_per_node)."""

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes}: use the number of nodes of the job (>= 1)")
        check_node(self.node, self.nodes)

    def check(self, num_experts: int) -> None:
        """ValueError unless `num_experts` experts fit this layout (before any heavy work)."""
        check_placement(num_experts, self.ep_size, self.nodes, self.gpus_per_node)
