"""Shared-randomness projection of updates: seeded bases, blocks and the Ferret core.

Pure numpy/torch (no Flower, no transformers). ``bases`` generates bit-reproducible
random directions from seeds; ``blocks`` partitions the trainable tensors; ``ferret``
encodes, aggregates and replays updates; ``wire`` packs them for transport.
"""

from fedpeft.projection.bases import (
    bases_for_block,
    basis,
    basis_scale,
    basis_variance,
    orthonormal_basis,
    project,
    reconstruct,
)
from fedpeft.projection.blocks import Block, BlockLayout, layout_of, partition_blocks
from fedpeft.projection.ferret import (
    REFERENCE,
    Coefficients,
    FerretConfig,
    FerretServerState,
    RoundUpdate,
    aggregate_coefficients,
    apply_update,
    block_budgets,
    catch_up,
    client_seed,
    encode_update,
    pool_seed,
    reconstruct_update,
    seed_pool,
    server_update,
)
from fedpeft.projection.wire import (
    decode_coefficients,
    decode_round_updates,
    downlink_nbytes,
    encode_coefficients,
    encode_round_updates,
    upload_nbytes,
)

__all__ = [
    "REFERENCE",
    "Block",
    "BlockLayout",
    "Coefficients",
    "FerretConfig",
    "FerretServerState",
    "RoundUpdate",
    "aggregate_coefficients",
    "apply_update",
    "bases_for_block",
    "basis",
    "basis_scale",
    "basis_variance",
    "block_budgets",
    "catch_up",
    "client_seed",
    "decode_coefficients",
    "decode_round_updates",
    "downlink_nbytes",
    "encode_coefficients",
    "encode_round_updates",
    "encode_update",
    "layout_of",
    "orthonormal_basis",
    "partition_blocks",
    "pool_seed",
    "project",
    "reconstruct",
    "reconstruct_update",
    "seed_pool",
    "server_update",
    "upload_nbytes",
]
