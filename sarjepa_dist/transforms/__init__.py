"""Pure-torch transforms (no Ray): gradient-domain operators, input conditioning, augmentation.

Everything takes and returns ``(B, C, H, W)`` batches and works on any device; see
``docs/CONTRACTS.md`` (transforms) and ``METHOD.md`` §2 for the operator.
"""

from sarjepa_dist.transforms.augment import TTA_CROP_FRACTION, augment_batch, center_resize, crop_views
from sarjepa_dist.transforms.conditioning import (
    condition,
    robust_quantiles,
    robust_standardize,
    robust_stats,
)
from sarjepa_dist.transforms.gradient import (
    check_radii,
    fuse_scales,
    gradient_by_ratio,
    gradient_domain,
    sobel,
)
from sarjepa_dist.transforms.inputs import INPUT_KEYS, check_input_keys, prepare_inputs, standardize_gradient

__all__ = [
    "INPUT_KEYS",
    "TTA_CROP_FRACTION",
    "augment_batch",
    "center_resize",
    "crop_views",
    "check_input_keys",
    "check_radii",
    "condition",
    "fuse_scales",
    "gradient_by_ratio",
    "gradient_domain",
    "prepare_inputs",
    "robust_quantiles",
    "robust_standardize",
    "robust_stats",
    "sobel",
    "standardize_gradient",
]
