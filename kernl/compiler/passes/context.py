"""What a pass works on: the graph, and the weights behind its placeholders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx


@dataclass
class PassContext:
    graph: torch.fx.Graph
    weights: dict[str, torch.Tensor]  # placeholder name -> tensor, for parameters, buffers and constants

    def add_weight(self, name: str, value: torch.Tensor) -> torch.fx.Node:
        """A new weight input computed at compile time (e.g. Q, K and V weights concatenated)."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        with self.graph.inserting_after(placeholders[0] if placeholders else None):
            node = self.graph.placeholder(name)
        fake_mode = next(
            (n.meta["val"].fake_mode for n in placeholders if hasattr(n.meta.get("val"), "fake_mode")), None
        )
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)  # weights have fixed sizes
        self.weights[node.name] = value
        return node

    def drop_unused_weights(self) -> None:
        """Weights no node reads any more (replaced by a fused copy) leave the graph and the bundle."""
        for node in list(self.graph.nodes):
            if node.op == "placeholder" and node.name in self.weights and not node.users:
                self.graph.erase_node(node)
                del self.weights[node.name]
