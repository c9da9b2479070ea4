"""Compatibility methods behind one registry; importing this package registers them all."""

# Importing each method module registers it.
from compatkit.methods import (  # noqa: F401
    bct,
    bct_ract,
    bict,
    contrastive,
    fastfill,
    fct,
    independent,
    l2,
    lwf,
    pct,
    simclr,
    triplet,
    unibct,
)
from compatkit.methods.base import (
    METHODS,
    EvalEmbedders,
    LossOutput,
    Method,
    MethodBatch,
    MethodConfig,
    MethodContext,
    create_method,
    method_config_from_dict,
    register_method,
)

__all__ = [
    "METHODS",
    "EvalEmbedders",
    "LossOutput",
    "Method",
    "MethodBatch",
    "MethodConfig",
    "MethodContext",
    "create_method",
    "method_config_from_dict",
    "register_method",
]
