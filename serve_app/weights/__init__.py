"""Model weights: where a model's files come from and how they reach a node's cache.

``resolve_model(source, cache_dir)`` is the one entry point: the embedded model (converted once),
a local folder, an ``s3://`` bucket prefix (boto3) or the vendor's ``licensed:`` weights
(presigned URLs from the license server), each fetched once per node, verified against its
manifest and resumed where a cut download stopped.
"""

from serve_app.weights.embedded import (
    BUILTIN_PREFIX,
    EMBEDDED_MODEL_WHEEL,
    SMOLLM2,
    ensure_smollm2,
)
from serve_app.weights.fetch import WeightsError
from serve_app.weights.licensed import LICENSED_PREFIX
from serve_app.weights.s3 import S3_PREFIX, S3Options
from serve_app.weights.sources import (
    claimed_identity,
    confirmed_identity,
    resolve_model,
    weight_bytes,
)

__all__ = [
    "BUILTIN_PREFIX", "EMBEDDED_MODEL_WHEEL", "LICENSED_PREFIX", "S3_PREFIX", "SMOLLM2",
    "S3Options", "WeightsError", "claimed_identity", "confirmed_identity", "ensure_smollm2",
    "resolve_model", "weight_bytes",
]
