"""The coordinator's projection weights in oneDNN's layout, for the CPU (``kernels/linear.py``, "Prepacked weights").

Every matrix that goes through ``linear`` is prepacked where it is large enough (``packable``): attention's
stacked q/k/v and o projections, the dense MLPs and shared experts, the LM head. The embedding stays plain (it is
indexed, not multiplied); a tied LM head therefore gets a packed copy of its own, the one weight this
holds twice. Routers and the shared expert's gate are products of their own (``r @ w.T``) and small:
they stay plain.
"""

from __future__ import annotations

import dataclasses
import logging

from moeshard.cluster.model.checkpoint import DenseWeights, ExpertWeights, LayerWeights
from moeshard.kernels.linear import prepack

logger = logging.getLogger(__name__)


def prepack_dense(weights: DenseWeights) -> DenseWeights:
    """The same weights, with every projection prepacked (see the module docstring); the plain ones are
    released unless held elsewhere."""
    layers = [_prepack_layer(layer) for layer in weights.layers]
    logger.info("prepacked the projection weights of %d layers for oneDNN", len(layers))
    return dataclasses.replace(weights, layers=layers, lm_head=prepack(weights.lm_head))


def _prepack_layer(layer: LayerWeights) -> LayerWeights:
    return dataclasses.replace(
        layer,
        qkv_proj=prepack(layer.qkv_proj),
        o_proj=prepack(layer.o_proj),
        mlp=_prepack_ffn(layer.mlp),
        shared_expert=_prepack_ffn(layer.shared_expert),
    )


def _prepack_ffn(ffn: ExpertWeights | None) -> ExpertWeights | None:
    return None if ffn is None else ExpertWeights(w1=prepack(ffn.w1), w3=prepack(ffn.w3), w2=prepack(ffn.w2))
