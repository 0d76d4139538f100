"""prune: weight pruning with one-shot least-squares reconstruction (lossy).

Rewrite cases (statistics in parentheses):
- ``mode=unstructured``: the lowest-importance weights of Conv/ConvTranspose/Gemm/MatMul
  constants become zero, ``round(sparsity * size)`` per layer (``scope=layer``) or over all
  layers together (``scope=global``); ``layers={node:s}`` overrides the target of a node.
  The first and last prunable layers and depthwise convolutions stay dense unless
  ``keep_ends=false`` / ``depthwise=true`` or named in ``layers`` (``weights_pruned``,
  ``layers_pruned``, ``sparsity``).
- ``mode=nm``: N:M sparsity (2:4 by default): in every run of ``m`` weights along the
  reduction dimension (input channels for Conv) only ``n`` stay; layers whose reduction
  size is not a multiple of ``m`` are skipped with a warning.
- ``mode=channels``: output channels of Conv/ConvTranspose/Gemm/MatMul are removed
  physically together with the matching inputs of every consumer (BatchNormalization,
  depthwise Conv, per-channel constants, the next Conv/Gemm/MatMul); residual Add/Mul and
  Concat tie channel groups that are pruned together or not at all
  (``channels_removed``, ``groups_pruned``, ``params_removed``).
- ``importance``: ``magnitude`` (|w|, channel weight norms) or ``activation`` (|w| times the
  input's RMS on calibration data; channels: input energy times next-layer weight norm).
- ``reconstruct=true`` (needs calibration data): layer by layer in graph order, every
  pruned layer and every layer downstream of one gets its remaining weights and bias
  refitted by least squares to reproduce the ORIGINAL model's layer output from the
  pruned model's inputs (``layers_reconstructed``; per-layer calibration error before
  and after in details["reconstruction"]). The ridge (``damp``) pulls toward the trained
  weights, so directions the calibration data never excites keep their values; a layer
  with fewer calibration rows than 2x its weights per output is not refitted (warned).
- ``sparse_storage=true``: pruned weights of at least 60% sparsity are stored as their
  nonzero values and int32 positions, rebuilt by ConstantOfShape/ScatterElements/Reshape
  that ONNX Runtime constant-folds at load time: smaller files, same speed
  (``weights_sparse_stored``). Put it in the last pass that needs the weights as
  constants (a later quantize sees the rebuilt weights as computed tensors).
Unstructured and N:M pruning are idempotent (a second run finds nothing new to prune and
reports modified=False); channel pruning removes a fraction of the channels that are
left, so a second run shrinks the model again. Run ``fold`` first: weights must be
initializers (not Constant nodes or computed tensors) to be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from opc.errors import PipelineError
from opc.pass_api import Pass, PassContext, PassResult, option
from opc.passes._prune import calib, masks
from opc.passes._prune.layers import Layer, find_layers, topo_order
from opc.passes._prune.reconstruct import Accumulator, can_fit_bias, reconstructable


@dataclass
class Prune(Pass):
    """Zero or remove low-importance weights; refit the rest on calibration data."""

    name: ClassVar[str] = "prune"
    summary: ClassVar[str] = "weight pruning (unstructured, N:M, channels) with least-squares reconstruction"
    exact: ClassVar[bool] = False

    sparsity: float = option(0.5, "fraction of weights (channels mode: of channels) to remove", low=0.0, high=0.99)
    mode: Literal["unstructured", "nm", "channels"] = option("unstructured", "sparsity pattern")
    scope: Literal["global", "layer"] = option("global", "one threshold over all layers, or the target in every layer")
    n: int = option(2, "N of N:M (weights kept per group)", low=1)
    m: int = option(4, "M of N:M (group length along the reduction dimension)", low=1)
    importance: Literal["magnitude", "activation"] = option("magnitude", "what ranks weights or channels")
    reconstruct: bool = option(True, "refit remaining weights by least squares on calibration data")
    exclude: tuple[str, ...] = option((), "node names or op types left unpruned")
    layers: dict[str, float] | None = option(None, "per-node target sparsity overrides {node:sparsity}")
    keep_ends: bool = option(True, "leave the first and last prunable layer dense (unstructured, nm)")
    depthwise: bool = option(False, "prune depthwise Conv weights too (unstructured, nm: few weights, very sensitive)")
    sparse_storage: bool = option(False, "store >=60%-sparse weights as values + positions (smaller files)")
    samples: int = option(256, "calibration samples used", low=1)
    batch: int = option(32, "calibration batch size", low=1)
    damp: float = option(0.01, "reconstruction ridge, relative to the mean input energy", low=0.0)
    channel_multiple: int = option(8, "channels mode: keep a multiple of this many channels per group "
                                      "(ONNX Runtime CPU kernels run blocks of 8)", low=1)

    # --- entry -----------------------------------------------------------------------------
    @property
    def overrides(self) -> dict[str, float]:
        return dict(self.layers or {})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.mode == "nm" and self.n >= self.m:
            raise PipelineError(f"prune(n={self.n},m={self.m}): n must be smaller than m")
        all_layers = find_layers(graph)
        names = {layer.name for layer in all_layers}
        unknown = sorted(set(self.overrides) - names)
        if unknown:
            valid = ", ".join(sorted(names)[:8]) or "none"
            raise PipelineError(f"prune(layers=...): no prunable node named {', '.join(unknown)} (e.g. {valid})")
        for key, value in self.overrides.items():
            if not 0.0 <= value <= 0.99:
                raise PipelineError(f"prune(layers=...): sparsity {value} for '{key}' is outside [0, 0.99]")
        if self.importance == "activation" and ctx.calibration is None:
            ctx.calibration_batches()  # raises the DataError asking for --calibration-data
        original = ctx.to_model(graph)
        if self.mode == "channels":
            from opc.passes._prune.channels import prune_channels

            return prune_channels(self, graph, ctx, original, all_layers)
        return self._prune_weights(graph, ctx, original, all_layers)

    def excluded(self, layer: Layer) -> bool:
        return layer.name in self.exclude or layer.op in self.exclude or layer.output.name in self.exclude

    # --- unstructured and N:M --------------------------------------------------------------
    def _candidates(self, graph: gs.Graph, all_layers: list[Layer]) -> list[Layer]:
        order = {id(node): i for i, node in enumerate(topo_order(graph))}
        ordered = sorted(all_layers, key=lambda layer: order[id(layer.node)])
        ends = {id(ordered[0]), id(ordered[-1])} if self.keep_ends and ordered else set()
        def default_on(layer: Layer) -> bool:
            return id(layer) not in ends and (self.depthwise or not is_depthwise(layer))

        return [layer for layer in ordered
                if not self.excluded(layer) and (layer.name in self.overrides or default_on(layer))]

    def _prune_weights(self, graph, ctx, original, all_layers) -> PassResult:
        candidates = self._candidates(graph, all_layers)
        warnings: list[str] = []
        if self.mode == "nm":
            kept = []
            for layer in candidates:
                if layer.channels_per_column_group() % self.m:
                    warnings.append(f"prune: '{layer.name}' skipped, its reduction runs of "
                                    f"{layer.channels_per_column_group()} are not a multiple of m={self.m}")
                else:
                    kept.append(layer)
            candidates = kept
        scores = self._scores(candidates, ctx, original)
        layer_masks = self._masks(candidates, scores)

        before = {id(layer): layer.weight.values.copy() for layer in candidates}
        newly = 0
        changed: list[Layer] = []
        for layer, mask in zip(candidates, layer_masks):
            mat = layer.to_matrix()
            lost = int(np.count_nonzero(mat[~mask]))
            if lost:
                layer.weight.values = layer.from_matrix(np.where(mask, mat, 0))
                newly += lost
                changed.append(layer)
        if not newly:
            return PassResult(False, self._weight_stats(candidates, before, 0, 0), warnings=warnings,
                              details={"layers": self._layer_table(candidates, before)})
        masks_by_layer = {id(layer): mask for layer, mask in zip(candidates, layer_masks)}
        recon = self._maybe_reconstruct(graph, ctx, original, all_layers, changed, masks_by_layer, {}, warnings)
        stats = self._weight_stats(candidates, before, newly, len(changed))
        stats["layers_reconstructed"] = sum("skipped" not in r for r in recon)
        details = {"layers": self._layer_table(candidates, before), "reconstruction": recon}
        if self.sparse_storage:
            stats["weights_sparse_stored"] = store_sparse(graph, candidates)
        return PassResult(True, stats, details=details, warnings=warnings)

    def _scores(self, layers: list[Layer], ctx, original) -> list[np.ndarray]:
        mags = [np.abs(layer.to_matrix()).astype(np.float64) for layer in layers]
        if self.importance == "magnitude" or not layers:
            return mags
        rms = input_rms(self, ctx, original, layers)
        return [mag * column_scale(layer, r) for mag, layer, r in zip(mags, layers, rms)]

    def _masks(self, layers: list[Layer], scores: list[np.ndarray]) -> list[np.ndarray]:
        if self.mode == "nm":
            return [masks.nm_mask(s, self.n, self.m) for s in scores]
        if self.scope == "layer":
            return [masks.layer_mask(s, self.overrides.get(layer.name, self.sparsity))
                    for layer, s in zip(layers, scores)]
        free = [i for i, layer in enumerate(layers) if layer.name not in self.overrides]
        out: list[np.ndarray | None] = [None] * len(layers)
        for i, m in zip(free, masks.global_masks([scores[i] for i in free], self.sparsity)):
            out[i] = m
        for i, layer in enumerate(layers):
            if out[i] is None:
                out[i] = masks.layer_mask(scores[i], self.overrides[layer.name])
        return out

    def _weight_stats(self, layers, before, newly, changed) -> dict:
        total = sum(layer.weight.values.size for layer in layers)
        zeros = sum(int(layer.weight.values.size - np.count_nonzero(layer.weight.values)) for layer in layers)
        return {"weights_pruned": int(newly), "layers_pruned": int(changed),
                "sparsity": round(zeros / total, 6) if total else 0.0}

    @staticmethod
    def _layer_table(layers, before) -> list[dict]:
        rows = []
        for layer in layers:
            w = layer.weight.values
            rows.append({"node": layer.name, "op": layer.op,
                         "sparsity": round(1.0 - np.count_nonzero(w) / w.size, 6) if w.size else 0.0,
                         "params_before": int(np.count_nonzero(before[id(layer)])),
                         "params_after": int(np.count_nonzero(w))})
        return rows

    # --- reconstruction ----------------------------------------------------------------------
    def _maybe_reconstruct(self, graph, ctx, original, all_layers, changed, masks_by_layer, out_keep,
                           warnings) -> list[dict]:
        if not self.reconstruct:
            return []
        if ctx.calibration is None:
            warnings.append("prune: no calibration data, weights pruned without reconstruction "
                            "(give --calibration-data or reconstruct=false)")
            return []
        done, skipped = reconstruct_layers(self, graph, ctx, original, all_layers, changed, masks_by_layer,
                                           out_keep)
        if skipped:
            warnings.append(f"prune: {len(skipped)} layer(s) not refitted, too few calibration samples "
                            f"(e.g. '{skipped[0]['node']}': {skipped[0]['skipped']})")
        return done + skipped


# --- shared by both modes ---------------------------------------------------------------------

def is_depthwise(layer: Layer) -> bool:
    return layer.op == "Conv" and layer.group > 1 and layer.weight.values.shape[1] == 1


def input_rms(p: Prune, ctx, model, layers: list[Layer]) -> list[np.ndarray]:
    """Root mean square of each layer's input channels on calibration data (original model)."""
    tap = calib.Tap(model, [layer.input.name for layer in layers], ctx.ort_session)
    sums = [None] * len(layers)
    counts = [0] * len(layers)
    for feeds in calib.batches(ctx, p.batch, p.samples):
        values = tap.run(feeds)
        for i, layer in enumerate(layers):
            x = values[layer.input.name].astype(np.float64)
            axis = 1 if layer.op in ("Conv", "ConvTranspose") else x.ndim - 1
            sq = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) ** 2
            sums[i] = sq.sum(0) if sums[i] is None else sums[i] + sq.sum(0)
            counts[i] += sq.shape[0]
    return [np.sqrt(s / max(c, 1)) for s, c in zip(sums, counts)]


def column_scale(layer: Layer, rms: np.ndarray) -> np.ndarray:
    """Per-entry input RMS in the layer's matrix layout ([O, cols] broadcastable)."""
    mat_shape = layer.to_matrix().shape
    if layer.op in ("Conv", "ConvTranspose"):
        g = layer.group
        cg = rms.size // g
        kpos = mat_shape[1] // cg
        og = mat_shape[0] // g
        per_group = rms.reshape(g, 1, cg)
        cols = np.tile(per_group, (1, kpos, 1)).reshape(g, 1, kpos * cg)
        return np.broadcast_to(cols, (g, og, kpos * cg)).reshape(mat_shape)
    return rms.reshape(1, -1)


def refit_layers(p: Prune, graph, all_layers, changed) -> list[Layer]:
    """Changed layers and every layer downstream of one, in graph order (minus exclusions)."""
    changed_ids = {id(layer.node) for layer in changed}
    by_node = {id(layer.node): layer for layer in all_layers}
    dirty: set[int] = set()
    out = []
    for node in topo_order(graph):
        touched = id(node) in changed_ids or any(id(t) in dirty for t in node.inputs)
        if not touched:
            continue
        dirty.update(id(t) for t in node.outputs)
        layer = by_node.get(id(node))
        if layer is not None and reconstructable(layer) and not p.excluded(layer):
            out.append(layer)
    return out


def levels(graph, layers: list[Layer]) -> list[list[Layer]]:
    """Layers grouped so that no layer depends on another of its own group or a later one."""
    ids = {id(layer.node): layer for layer in layers}
    depth: dict[int, int] = {}
    level_of: dict[int, int] = {}
    for node in topo_order(graph):
        d = max((depth.get(id(t), 0) for t in node.inputs), default=0)
        if id(node) in ids:
            level_of[id(node)] = d
            d += 1
        for t in node.outputs:
            depth[id(t)] = d
    grouped: dict[int, list[Layer]] = {}
    for layer in layers:
        grouped.setdefault(level_of[id(layer.node)], []).append(layer)
    return [grouped[k] for k in sorted(grouped)]


MIN_ROWS_PER_UNKNOWN = 1  # calibration rows (samples x positions) per refitted weight of an output


def reconstruct_layers(p: Prune, graph, ctx, original, all_layers, changed, masks_by_layer,
                       out_keep: dict[str, np.ndarray]) -> list[dict]:
    """Refit layer by layer; ``out_keep`` maps a layer's output name to its kept channels."""
    todo = refit_layers(p, graph, all_layers, changed)
    if not todo:
        return [], []
    report = []
    for level in levels(graph, todo):
        current = ctx.to_model(graph)
        target_tap = calib.Tap(original, [layer.output.name for layer in level], ctx.ort_session)
        input_tap = calib.Tap(current, [layer.input.name for layer in level], ctx.ort_session)
        accs = []
        for layer in level:
            n_out = layer.to_matrix().shape[0]
            accs.append(Accumulator(layer, n_out, can_fit_bias(layer)))
        for feeds in calib.batches(ctx, p.batch, p.samples):
            xs = input_tap.run(feeds)
            ys = target_tap.run(feeds)
            for layer, acc in zip(level, accs):
                y = ys[layer.output.name]
                keep = out_keep.get(layer.output.name)
                if keep is not None:
                    y = np.take(y, keep, axis=1 if layer.op == "Conv" else y.ndim - 1)
                acc.add(xs[layer.input.name], y)
        for layer, acc in zip(level, accs):
            mask = masks_by_layer.get(id(layer))
            if mask is None:
                mask = np.ones(layer.to_matrix().shape, dtype=bool)
            mask = mask & (layer.to_matrix() != 0) if id(layer) in masks_by_layer else mask
            w0 = acc.current()
            err0 = acc.error(w0)
            row = {"node": layer.name, "op": layer.op, "rows": int(acc.rows), "error_before": round(err0, 8)}
            unknowns = int(mask.sum(1).max()) + int(acc.fit_bias) if mask.size else 0
            if acc.rows < MIN_ROWS_PER_UNKNOWN * unknowns:
                # fewer equations than weights: the fit would interpolate the calibration
                # samples and generalise badly (a classifier fed 16 images, say)
                row.update(error_after=round(err0, 8), skipped=f"{acc.rows} calibration rows for "
                           f"{unknowns} weights per output (needs {MIN_ROWS_PER_UNKNOWN}x)")
                report.append(row)
                continue
            w1 = acc.solve(mask, p.damp)
            err1 = acc.error(w1)
            if np.all(np.isfinite(w1)) and err1 <= err0:
                acc.write(w1)
            else:
                err1 = err0
            row["error_after"] = round(err1, 8)
            report.append(row)
    return [r for r in report if "skipped" not in r], [r for r in report if "skipped" in r]


def store_sparse(graph: gs.Graph, layers: list[Layer]) -> int:
    from opc.passes._prune.storage import to_sparse_constant

    count = sum(to_sparse_constant(graph, layer) for layer in layers)
    if count:
        graph.toposort()  # the rebuild nodes were appended at the end
    return count
