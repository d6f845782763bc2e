"""LoRA branches on the og model builder's base graph, and the adapter tensors that feed them.

The multi-LoRA base graph is the builder's own graph of the *base* model (the graph a merged
engine has: q/k/v packed into one MatMul, int4 weights where asked), and ftd adds one low-rank
branch per projection that an adapter may target:

    y  = MatMul(x, W)                       # MatMul or MatMulNBits, exactly as the builder made it
    y' = y + MatMul(MatMul(x, A), B)        # A [in, R], B [R, out]: graph inputs, rank R symbolic

An `.onnx_adapter` supplies A and B, scale folded into B. The packed q/k/v MatMul gets one branch
too, so it stays packed; A holds the q, k and v A matrices side by side, and B comes in one of two
layouts:

- "chunks" (adapters that train q_proj/k_proj/v_proj): the output columns cut into chunks of the
  k/v width (one per k and v, `heads / kv_heads` for q), and B [chunks, R, width] holds only each
  chunk's own rows of its projection's B. The branch reshapes x·A [.., 3R] to [.., 3, 1, R],
  gathers each chunk's projection (q repeated for its chunks; no Gather when q is as wide as k),
  multiplies batch-wise and flattens: two Reshapes (and a Gather) more than a plain branch, but
  none of the zeros a block-diagonal B reads on every token (2/3 of it). R is the adapter's
  largest q/k/v rank; a smaller or untrained projection is zero-padded to it.
- "blocks" (a fused HF `qkv_proj` module, as Phi-3's, or widths that do not divide): B [R, out]
  block-diagonal, each projection's rows in its own columns (a fused module: one dense block).

Why not the builder's own `adapter_path` (what ftd did before): it turns packing off once LoRA is
on, which costs two more base MatMuls per layer, and it emits a branch per projection; at int4 it
also quantises the LoRA MatMuls unless each is excluded by name. On the 8-layer benchmark model
that graph had 184 nodes more than the merged engine's; this one has 136 (120 with a
block-diagonal B, which read 23% more LoRA bytes per token).

Everything here is pure (a graph file and tensors in, a graph file and arrays out), so the stage
in `tasks/backends/onnx_genai/multi_lora.py` and the decode benchmark share it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ftd.errors import FtdError
from tasks.merge import module_scale

# Base MatMuls of the builder's graphs: /model/layers.{i}/attn/qkv_proj/MatMul, .../mlp/up_proj/MatMul_Q4
BASE_MATMUL = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<module>\w+)/MatMul(?:_Q\d+)?$")
# HF modules that hold several graph projections, in the order of B's rows (Phi-3: qkv_proj = [q; k; v]).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PACKED_QKV = "qkv_proj"  # the builder's packed q/k/v MatMul; its output columns are [q | k | v]
QKV = FUSED[PACKED_QKV]  # the packed MatMul's projections, in output-column order


def input_names(layer: int, block: str, module: str) -> tuple[str, str]:
    """Graph input names of one branch (the builder's naming for its baked LoRA initializers)."""
    prefix = f"model.layers.{layer}.{block}.{module}"
    return f"{prefix}.lora_A.MatMul.weight", f"{prefix}.lora_B.MatMul.weight"


def add_lora_branches(model_path: Path, base_config: dict, modules: list[str]) -> dict[str, dict]:
    """Add a LoRA branch after every base MatMul that one of `modules` (HF names) updates; rewrite
    `model_path` in place (its external weight file is untouched). Returns the new graph inputs:
    name -> {layer, block, module, ab, features, dtype[, parts, layout, chunk]}, where a B input's
    `parts` maps each HF projection it carries to its output column range, and `layout` "chunks"
    (with the chunk width) marks the packed q/k/v branch's chunked B."""
    import onnx
    from onnx import TensorProto, helper

    wanted = set(modules) | {part for m in modules for part in FUSED.get(m, ())}
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    weights = {init.name: list(init.dims) for init in graph.initializer}
    elem_types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    specs: dict[str, dict] = {}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        match = BASE_MATMUL.match(node.name)
        if not match or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        layer, block, module = int(match["layer"]), match["block"], match["module"]
        in_features, out_features = _features(node, weights)
        parts = _output_parts(module, out_features, base_config)
        if not wanted & ({module} | set(parts)):
            continue
        elem_type = elem_types.get(node.output[0], TensorProto.FLOAT)
        dtype = helper.tensor_dtype_to_np_dtype(elem_type).name
        a_name, b_name = input_names(layer, block, module)
        rank = f"lora_rank_{layer}_{module}"
        chunk = _chunk_width(parts) if PACKED_QKV not in modules else None
        b_shape = [rank, out_features] if chunk is None else [out_features // chunk, rank, chunk]
        a_columns = rank if chunk is None else f"lora_rank_x3_{layer}_{module}"
        graph.input.append(helper.make_tensor_value_info(a_name, elem_type, [in_features, a_columns]))
        graph.input.append(helper.make_tensor_value_info(b_name, elem_type, b_shape))
        common = {"layer": layer, "block": block, "module": module, "dtype": dtype}
        specs[a_name] = {**common, "ab": "A", "features": in_features}
        specs[b_name] = {**common, "ab": "B", "features": out_features, "parts": parts}
        if chunk is not None:
            specs[b_name] |= {"layout": "chunks", "chunk": chunk}

        stem = f"/model/layers.{layer}/{block}/{module}"
        output = node.output[0]  # consumers keep reading this name: the branch's Add now writes it
        node.output[0] = f"{stem}/MatMul/base_output_0"
        down, up = f"{stem}/lora_A/MatMul/output_0", f"{stem}/lora_B/MatMul/output_0"
        nodes.append(helper.make_node("MatMul", [node.input[0], a_name], [down], name=f"{stem}/lora_A/MatMul"))
        if chunk is None:
            nodes.append(helper.make_node("MatMul", [down, b_name], [up], name=f"{stem}/lora_B/MatMul"))
        else:
            nodes += _chunked_b(graph, stem, down, b_name, up, _chunk_parts(parts, chunk))
        nodes.append(helper.make_node("Add", [node.output[0], up], [output], name=f"{stem}/lora/Add"))
    if not specs:
        raise FtdError(f"{model_path}: the og builder's graph has no MatMul for modules " + ", ".join(modules))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(model_path))
    return specs


def _chunk_width(parts: dict[str, list[int]]) -> int | None:
    """The k/v width when this MatMul is the packed q/k/v one and q's width is a multiple of it."""
    if tuple(parts) != QKV:
        return None
    q, kv = (parts["q_proj"][1] - parts["q_proj"][0]), (parts["k_proj"][1] - parts["k_proj"][0])
    return kv if q % kv == 0 else None


def _chunk_parts(parts: dict[str, list[int]], chunk: int) -> list[int]:
    """For each output chunk, the index (0 q, 1 k, 2 v) of the projection it belongs to."""
    return [QKV.index(p) for p, (start, stop) in parts.items() for _ in range(start, stop, chunk)]


def _chunked_b(graph, stem: str, down: str, b_name: str, up: str, chunk_parts: list[int]) -> list:
    """x·A [.., 3R] -> [.., 3, 1, R] -> (each chunk's projection) -> ·B [chunks, R, w] -> [.., out]."""
    from onnx import helper, numpy_helper

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), f"{stem}/lora/{name}"))
        return f"{stem}/lora/{name}"

    grouped, product = f"{stem}/lora/Reshape/output_0", f"{stem}/lora_B/MatMul/output_0_chunks"
    nodes = [helper.make_node("Reshape", [down, const("groups", [0, 0, 3, 1, -1])], [grouped],
                              name=f"{stem}/lora/Reshape")]  # fmt: skip
    if chunk_parts != [0, 1, 2]:  # q wider than k: repeat q's group for each of its chunks
        chunks = f"{stem}/lora/Gather/output_0"
        nodes.append(helper.make_node("Gather", [grouped, const("chunk_parts", chunk_parts)], [chunks], axis=2,
                                      name=f"{stem}/lora/Gather"))  # fmt: skip
        grouped = chunks
    nodes += [
        helper.make_node("MatMul", [grouped, b_name], [product], name=f"{stem}/lora_B/MatMul"),
        helper.make_node("Reshape", [product, const("flat", [0, 0, -1])], [up], name=f"{stem}/lora/Flatten"),
    ]
    return nodes


def _features(node, weights: dict[str, list[int]]) -> tuple[int, int]:
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"], attrs["N"]
    if node.input[1] not in weights:
        raise FtdError(f"{node.name}: its weight {node.input[1]} is not an initializer")
    k, n = weights[node.input[1]]
    return k, n


def _output_parts(module: str, out_features: int, config: dict) -> dict[str, list[int]]:
    """Column ranges of the HF projections one base MatMul computes."""
    if module != PACKED_QKV:
        return {module: [0, out_features]}
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    if q + 2 * kv != out_features:
        raise FtdError(f"packed qkv_proj has {out_features} outputs, the config says q {q} + k {kv} + v {kv}")
    return {"q_proj": [0, q], "k_proj": [q, q + kv], "v_proj": [q + kv, q + 2 * kv]}


# ---------------------------------------------------------------- one adapter's tensors


def adapter_arrays(specs: dict[str, dict], config: dict, pairs: dict, name: str) -> dict[str, np.ndarray]:
    """The arrays one adapter feeds to the branches `specs` describes: A [in, R] (the A matrices of
    the projections a branch carries, side by side, transposed from peft's [r, in]) and B: [R, out]
    block-diagonal (each projection's scaled B^T in its own rows and columns), or for a "chunks"
    branch [chunks, R, width] (`_chunk_arrays`). A branch whose projections this adapter does not
    train gets rank-1 zeros. `pairs`: `tasks.merge.read_adapter`."""
    by_layer_module = {}
    for pair in pairs.values():
        match = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", pair.module)
        if not match:
            raise FtdError(f"adapter {name}: module {pair.module} is not a per-layer projection")
        by_layer_module[(int(match[1]), match[2])] = pair
    sizes = {(s["layer"], s["module"]): s["features"] for s in specs.values() if s["ab"] == "B"}
    arrays, used = {}, set()
    for a_name, a_spec in specs.items():
        if a_spec["ab"] != "A":
            continue
        layer, module = a_spec["layer"], a_spec["module"]
        b_name = input_names(layer, a_spec["block"], module)[1]
        b_spec, dtype = specs[b_name], np.dtype(a_spec["dtype"])
        pieces = _pieces(layer, module, b_spec, by_layer_module, sizes, used)
        if b_spec.get("layout") == "chunks":
            arrays[a_name], arrays[b_name] = _chunk_arrays(pieces, a_spec, b_spec, config, name)
            continue
        if not pieces:
            arrays[a_name] = np.zeros((a_spec["features"], 1), dtype)
            arrays[b_name] = np.zeros((1, b_spec["features"]), dtype)
            continue
        rank = sum(pair.A.shape[0] for pair, _, _ in pieces)
        A = np.zeros((a_spec["features"], rank), np.float32)
        B = np.zeros((rank, b_spec["features"]), np.float32)
        row = 0
        for pair, rows, (start, stop) in pieces:
            r = pair.A.shape[0]
            a, b = _checked(pair, rows, stop - start, a_spec, config, name)
            A[:, row : row + r], B[row : row + r, start:stop] = a, b
            row += r
        arrays[a_name], arrays[b_name] = A.astype(dtype), B.astype(dtype)
    unused = sorted(set(by_layer_module) - used)
    if unused:
        raise FtdError(f"adapter {name}: modules {unused[:4]} are not in the multi-LoRA graph")
    return arrays


def _checked(pair, rows, out_features: int, a_spec: dict, config: dict, name: str) -> tuple:
    """One adapter module's A^T [in, r] and scaled B^T [r, out] (B's `rows` only, where given),
    refused when its shapes are not the graph projection's."""

    module, r = a_spec["module"], pair.A.shape[0]
    if pair.A.shape[1] != a_spec["features"]:
        raise FtdError(f"adapter {name}: {pair.module} takes {pair.A.shape[1]} inputs, the graph's "
                       f"{module} {a_spec['features']}")  # fmt: skip
    b = pair.B.float() if rows is None else pair.B.float()[rows[0] : rows[1]]
    if b.shape[0] != out_features:
        raise FtdError(f"adapter {name}: {pair.module} has {b.shape[0]} outputs where the graph's "
                       f"{module} has {out_features}")  # fmt: skip
    return pair.A.float().numpy().T, (b * module_scale(config, pair.module, r)).numpy().T


def _chunk_arrays(pieces: list, a_spec: dict, b_spec: dict, config: dict, name: str) -> tuple:
    """A [in, 3R] (q, k, v, each zero-padded to R columns) and B [chunks, R, w] for a "chunks" branch."""
    width, columns = b_spec["chunk"], {tuple(c): p for p, c in b_spec["parts"].items()}
    rank = max([pair.A.shape[0] for pair, _, _ in pieces], default=1)
    A = np.zeros((a_spec["features"], 3 * rank), np.float32)
    B = np.zeros((b_spec["features"] // width, rank, width), np.float32)
    for pair, rows, (start, stop) in pieces:
        part = columns.get((start, stop))
        if part is None or rows is not None:  # cannot happen: fused qkv_proj adapters get "blocks"
            raise FtdError(f"adapter {name}: {pair.module} does not fit the chunked q/k/v branch")
        r, group = pair.A.shape[0], QKV.index(part)
        a, b = _checked(pair, None, stop - start, a_spec, config, name)
        A[:, group * rank : group * rank + r] = a
        B[start // width : stop // width, :r, :] = b.reshape(r, -1, width).transpose(1, 0, 2)
    dtype = np.dtype(a_spec["dtype"])
    return A.astype(dtype), B.astype(dtype)


def _pieces(layer: int, module: str, b_spec: dict, by_layer_module: dict, sizes: dict, used: set) -> list:
    """(pair, B rows or None, output columns) for each adapter module that updates this branch."""
    parts, out = b_spec["parts"], []
    for part, columns in parts.items():
        if (layer, part) in by_layer_module:
            out.append((by_layer_module[(layer, part)], None, columns))
            used.add((layer, part))
    for fused, fused_parts in FUSED.items():
        pair = by_layer_module.get((layer, fused))
        if pair is None:
            continue
        if tuple(parts) == fused_parts:  # the adapter's fused module is this packed MatMul
            out.append((pair, None, [0, b_spec["features"]]))
        elif module in fused_parts:  # the builder split it: this MatMul takes a slice of B's rows
            if any((layer, p) not in sizes for p in fused_parts):
                raise FtdError(f"{pair.module}: the graph lacks one of {fused_parts} in layer {layer}")
            start = sum(sizes[(layer, p)] for p in fused_parts[: fused_parts.index(module)])
            out.append((pair, (start, start + sizes[(layer, module)]), [0, b_spec["features"]]))
        else:
            continue
        used.add((layer, fused))
    return out
