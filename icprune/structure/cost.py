"""Analytic cost of a candidate plan: MACs and parameters as functions of kept channel counts.

From the shapes recorded once by :func:`icprune.structure.dependency.trace_dependencies`, each conv,
linear and BatchNorm module's cost is a product of its kept output and input channel counts:

- conv: ``positions * kernel * out * in / groups`` MACs, ``out * in / groups * kernel (+ out)``
  parameters; a depthwise conv has ``in / groups = 1``;
- linear: ``positions * out * in`` MACs, ``out * in (+ out)`` parameters;
- BatchNorm: no MACs, ``2 * channels`` parameters when affine;
- LayerNorm: no MACs, ``channels`` parameters for each of its weight and bias;
- a per-channel parameter (``layer_scale``): no MACs, ``channels * elements per channel``;
- an attention block: ``heads * MACs per head`` (its q, k, v projections, ``Q K^T``, ``A V`` and
  ``out_proj``, all linear in the heads kept) and ``heads * 3 * head_dim * (E + bias)``
  parameters of its q, k, v projections (``out_proj``'s are its own linear layer's, whose input
  features follow the heads).

Everything else (MACs of other operations, other parameters) is a constant: the measured total
minus these terms at full size. The MACs match ``icprune.count`` (FlopCounterMode) of the
applied model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from icprune.structure.dependency import Dependencies, LayerShape

#: The axis of a module a dependency kind prunes.
AXIS = {
    "output": "out", "depthwise": "out", "batchnorm": "out", "layernorm": "out",
    "parameter": "out", "heads": "out", "input": "in",
}  # fmt: skip


class CostModel:
    """MACs and parameters of a model whose groups keep given numbers of channels.

    Args:
        dependencies: the traced model (groups, shapes, measured totals).
    """

    def __init__(self, dependencies: Dependencies) -> None:
        self.shapes = dependencies.shapes
        self.channels = [g.channels for g in dependencies.groups]
        # module -> axis -> [(group index, features per channel)]
        self.links: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for index, group in enumerate(dependencies.groups):
            for dep in group.dependencies:
                axes = self.links.setdefault(dep.module, {"out": [], "in": []})
                axes[AXIS[dep.kind]].append((index, dep.repeat))
        full_macs, full_params = self._terms(self.channels)
        self.other_macs = dependencies.macs - full_macs
        self.other_params = dependencies.params - full_params

    def _terms(self, kept: Sequence[int]) -> tuple[int, int]:
        macs = params = 0
        for name, shape in self.shapes.items():
            out, inp = shape.out_channels, shape.in_channels
            for axis, links in self.links.get(name, {}).items():
                removed = sum((self.channels[g] - kept[g]) * repeat for g, repeat in links)
                if axis == "out":
                    out -= removed
                else:
                    inp -= removed
            m, p = _module_cost(shape, out, inp)
            macs += m
            params += p
        return macs, params

    def __call__(self, kept: Sequence[int]) -> tuple[int, int]:
        """``(macs, params)`` (ints) when group i keeps ``kept[i]`` of its channels."""
        macs, params = self._terms(kept)
        return macs + self.other_macs, params + self.other_params


def _module_cost(shape: LayerShape, out: int, inp: int) -> tuple[int, int]:
    """(MACs, params) of one module with ``out`` output and ``inp`` input channels kept."""
    if shape.kind == "batchnorm":
        return 0, 2 * out if shape.bias else 0
    if shape.kind == "parameter":
        return 0, out * shape.kernel
    if shape.kind == "attention":
        return out * shape.positions, out * shape.kernel
    if shape.kind == "layernorm":
        return 0, out * (int(shape.weight) + int(shape.bias))
    per_out = 1 if shape.kind == "depthwise" else inp // shape.groups
    weights = out * per_out * shape.kernel
    return shape.positions * weights, weights + (out if shape.bias else 0)
