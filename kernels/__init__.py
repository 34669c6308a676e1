"""moeshard.kernels: the tensor ops of one MoE layer, each with a Triton kernel and a torch reference.

    route -> permute (dispatch gather) -> expert_ffn (grouped SwiGLU) -> combine (weighted un-permute)

Dimensions: T tokens, D hidden, I expert hidden, E experts, K chosen per token, N rows.
Every op takes ``backend="auto"|"triton"|"torch"`` (see ``backend.py``) and an optional ``out=``.

This folder is also the repository's top-level ``kernels/``. Reached under that bare name (a Python
started in the repository root has it on ``sys.path``), it must not pass for Hugging Face's ``kernels``
package, which ``transformers`` probes for by name: it then defines nothing, runs no moeshard code and,
like a stray namespace folder, reports no file, so such probes see no package.
"""

if __name__ == "moeshard.kernels":
    from moeshard.kernels.backend import BACKENDS, ENV_VAR, resolve_backend, triton_interprets
    from moeshard.kernels.combine import combine
    from moeshard.kernels.destinations import dedupe_destinations
    from moeshard.kernels.expert_ffn import expert_ffn
    from moeshard.kernels.paged_attention import paged_attention
    from moeshard.kernels.paged_layout import PagedLayout
    from moeshard.kernels.permute import Permutation, PermutationPlan, permute, plan_permutation
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
        "route",
        "triton_interprets",
    ]
else:
    __all__ = []
    __file__ = None  # noqa: F811 - not a package of its own: transformers' probe reads a file-less module as none
