"""Grain input pipeline: utterance records -> padded batches of projections, acoustics, labels.

Batch i of training is a pure function of (seed, i) (Grain ``MapDataset`` random access), so
resuming from a checkpoint at step s just continues with batch s.
"""

from __future__ import annotations

import grain
import numpy as np

from btlm_jax.punctuation import features as feats_mod
from btlm_jax.punctuation import projection


def encode(record: dict, *, projection_dim: int, max_len: int) -> dict[str, np.ndarray]:
    """One utterance -> fixed-length arrays (truncated/padded to ``max_len`` words)."""
    words = record["words"][:max_len]
    n = len(words)
    acoustic = np.zeros((max_len, len(feats_mod.FEATURE_NAMES)), np.float32)
    acoustic[:n] = feats_mod.normalize_per_utterance(record["features"][:n])
    labels = np.zeros(max_len, np.int32)
    labels[:n] = record["labels"][:n]
    mask = np.zeros(max_len, bool)
    mask[:n] = True
    return {"proj": projection.project_tokens(words, projection_dim, max_len),
            "acoustic": acoustic, "labels": labels, "mask": mask}


def train_dataset(records, *, batch_size: int, projection_dim: int, max_len: int, seed: int):
    """Infinite, shuffled (reshuffled every epoch), batched ``MapDataset``; index it by step."""
    return (grain.MapDataset.source(records)
            .shuffle(seed=seed)
            .repeat(None)
            .map(lambda r: encode(r, projection_dim=projection_dim, max_len=max_len))
            .batch(batch_size, drop_remainder=True))


def eval_batches(records, *, batch_size: int, projection_dim: int, max_len: int):
    """Ordered batches covering every record once; the last one is padded with empty rows."""
    ds = (grain.MapDataset.source(records)
          .map(lambda r: encode(r, projection_dim=projection_dim, max_len=max_len))
          .batch(batch_size, drop_remainder=False))
    for batch in ds:
        n = len(batch["mask"])
        if n < batch_size:
            batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        yield batch
