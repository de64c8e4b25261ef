"""npu16 cost of every node of a captured graph (architecture level, batch 1, no WAPS groups).

Shared by bench/vela_compare.py (node by node beside Vela) and bench/npu16.py (Table 7 with
the ops between the layers). conv/linear go through ``layer_cost`` (striped to the config's
SRAM), element-wise ops through their units (add, pool, mean, pad, concat); flatten and
fused activations cost nothing.
"""
from __future__ import annotations

import numpy as np

from targets.npu16.cost import LayerCost, add_cost, avg_pool_cost, concat_cost, layer_cost, pad_cost, pool_cost
from targets.npu16.group_cost import layer_shape
from targets.npu16.params import NPU16


# captured-graph ops the compiler lowers to one command of codegen/npu16/cascade.CHAIN_COMMANDS
# (CONV/DWCONV, ADD, MAXPOOL; node_cost costs no matmul, softmax or layer norm)
CHAIN_NODE_OPS = frozenset({"conv2d", "linear", "add", "max_pool2d"})


def node_cost(graph, node, npu: NPU16) -> LayerCost | None:
    """npu16's cost of one captured-graph node at batch 1, int8 codes (None: nothing to run,
    e.g. flatten)."""
    ins = [graph[i] for i in node.inputs]
    shape = tuple(int(d) for d in node.shape)
    elems = int(np.prod(shape))
    if node.op in ("conv2d", "linear"):
        return layer_cost(layer_shape(graph, node, npu), npu)
    in_elems = int(np.prod(ins[0].shape)) if ins else 0
    if node.op == "add":
        return add_cost(node.name, in_elems, elems, npu)
    if node.op == "max_pool2d":
        kh, kw = node.attrs["kernel"]
        return pool_cost(node.name, in_elems, elems, kh * kw, 1, npu)
    if node.op == "avg_pool2d":
        kh, kw = node.attrs["kernel"]
        return avg_pool_cost(node.name, shape[0], in_elems, shape[1], shape[2], kh * kw * shape[1] * shape[2], 1, npu)
    if node.op == "global_avg_pool":
        c, h, wd = ins[0].shape
        return avg_pool_cost(node.name, c, in_elems, 1, 1, h * wd, 1, npu)
    if node.op == "pad":
        return pad_cost(node.name, in_elems, elems, npu)
    if node.op == "cat":
        return concat_cost(node.name, [int(np.prod(i.shape)) for i in ins], npu)
    return None


def graph_chains(graph, npu: NPU16):
    """Multi-op partitions of a captured graph on ``npu`` (codegen/npu16/cascade.form, the
    compiler's rule: single-consumer edges between conv/linear/add/max-pool nodes, each
    intermediate kept in SRAM when memory.keeps says it fits) and every node's cost with them:
    → (chains, {node name: LayerCost, cascaded where a chain keeps its input or output})."""
    from codegen.npu16.cascade import Node, cascaded_cost, form
    costs = {n.name: c for n in graph if (c := node_cost(graph, n, npu)) is not None}
    nodes = [Node(n.name, tuple(n.inputs), int(np.prod(n.shape)),
                  *(costs[n.name].act_split if n.name in costs else (0, 0)), n.name in costs and n.op in CHAIN_NODE_OPS)
             for n in graph]
    chains = form(nodes, {graph.output}, npu)
    for ch in chains:
        for name in ch.ops:
            node, cost = graph[name], costs[name]
            per_input = ([cost.bytes["input"]] if node.op in ("conv2d", "linear")
                         else [int(np.prod(graph[i].shape)) for i in node.inputs])
            costs[name] = cascaded_cost(cost, per_input, ch.keep_in(name), ch.keep_out(name), npu)
    return chains, costs
