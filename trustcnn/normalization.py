"""Per-channel input normalizations (mean, std) that both the data modules and the model builders name.

A leaf module (no imports) so that ``trustcnn.data`` and ``trustcnn.models`` can share these constants
without importing each other.
"""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The decoy digits' gray pixels in [0, 1] map to [-1, 1].
DECOY_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DECOY_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
