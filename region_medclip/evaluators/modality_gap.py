"""The modality gap: how far apart the image and text embeddings sit on the sphere."""

import numpy as np


def modality_gap(zimg: np.ndarray, ztxt: np.ndarray) -> float:
    """Euclidean distance between the centroids of ``zimg [N, D]`` and ``ztxt [M, D]``
    (L2-normalised embeddings; 0 when the two clouds share a centre, up to 2)."""
    return float(np.linalg.norm(np.mean(zimg, axis=0) - np.mean(ztxt, axis=0)))
