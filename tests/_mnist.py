"""The shipped MNIST subset as the training tests use it: flat float32 images, int32 labels."""

from __future__ import annotations

import numpy as np

from examples import data


def mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 in [0, 1], flattened to 784; labels as int32)."""
    mnist = data.load_mnist()
    images, labels = ((mnist.train_images, mnist.train_labels) if split == "train"
                      else (mnist.test_images, mnist.test_labels))
    return (images.reshape(len(images), -1).astype(np.float32) / 255.0,
            labels.astype(np.int32))
