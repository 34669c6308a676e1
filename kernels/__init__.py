"""moeshard.kernels: the tensor ops of one MoE layer, each with a Triton kernel and a torch reference.

    route -> permute (dispatch gather) -> expert_ffn (grouped SwiGLU) -> combine (weighted un-permute)

and the decoder's paged attention, RMSNorm and rotary embedding, the same way.

Dimensions: T tokens, D hidden, I expert hidden, E experts, K chosen per token, N rows.
Every op takes ``backend="auto"|"triton"|"torch"`` (see ``backend.py``); the MoE layer's take an optional
``out=``.

This folder is also the repository's top-level ``kernels/``. Reached under that bare name (a Python
started in the repository root has it on ``sys.path``), it must not pass for Hugging Face's ``kernels``
package, which ``transformers`` imports by name (from 5.25 on it depends on it). It runs no moeshard code:
where a ``kernels`` is installed elsewhere on ``sys.path``, that package takes the name, as in a Python
started anywhere else; where none is, it defines nothing and, like a stray namespace folder, reports no
file, so transformers' probe sees no package.
"""

if __name__ == "moeshard.kernels":
    from moeshard.kernels.backend import BACKENDS, ENV_VAR, resolve_backend, triton_interprets
    from moeshard.kernels.combine import combine
    from moeshard.kernels.destinations import dedupe_destinations
    from moeshard.kernels.expert_ffn import expert_ffn
    from moeshard.kernels.paged_attention import paged_attention
    from moeshard.kernels.paged_layout import PagedLayout
    from moeshard.kernels.permute import Permutation, PermutationPlan, permute, plan_permutation
    from moeshard.kernels.rms_norm import rms_norm
    from moeshard.kernels.rotary import rotary
    from moeshard.kernels.rotary_store import rotary_store
    from moeshard.kernels.route import RouterOutput, route

    __all__ = [
        "BACKENDS",
        "ENV_VAR",
        "PagedLayout",
        "Permutation",
        "PermutationPlan",
        "RouterOutput",
        "combine",
        "dedupe_destinations",
        "expert_ffn",
        "paged_attention",
        "permute",
        "plan_permutation",
        "resolve_backend",
        "rms_norm",
        "rotary",
        "rotary_store",
        "route",
        "triton_interprets",
    ]
else:
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _elsewhere = [entry for entry in _sys.path if _os.path.realpath(entry or ".") != _root]
    _installed = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _installed is not None:
        # A ``kernels`` installed elsewhere (Hugging Face's, which transformers imports): it takes the name,
        # as it would in a Python started anywhere else. The import returns what sys.modules then holds.
        _module = _util.module_from_spec(_installed)
        _sys.modules[__name__] = _module
        try:
            _installed.loader.exec_module(_module)
        except BaseException:
            del _sys.modules[__name__]
            raise
    else:
        __all__ = []
        __file__ = None  # noqa: F811 - not a package of its own: transformers' probe reads a file-less module as none
    del _machinery, _util, _os, _sys, _root, _elsewhere, _installed
