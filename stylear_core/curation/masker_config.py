"""Settings of the SAM masker, importable without torch or segment-anything (serving's config loads it)."""

from __future__ import annotations

from dataclasses import dataclass

from stylear_core.config import option


@dataclass
class MaskerConfig:
    """Which SAM to load and how the salient content is chosen and filled."""

    model_type: str = option(
        "vit_h",
        "SAM backbone: vit_h / vit_l / vit_b (checkpoint needed) or tiny (random)",
        choices=("vit_h", "vit_l", "vit_b", "tiny"),
    )
    checkpoint: str = option("", "local SAM checkpoint (sam_vit_h_4b8939.pth layout); unused for tiny")
    points_per_side: int = option(16, "point grid side of the automatic mask generator (cost ~ its square)")
    pred_iou_thresh: float = option(0.88, "drop SAM masks whose predicted IoU is lower")
    stability_score_thresh: float = option(0.95, "drop SAM masks whose stability score is lower")
    min_object_fraction: float = option(0.01, "ignore masks smaller than this fraction of the image")
    max_object_fraction: float = option(
        0.6, "ignore masks larger than this fraction (background, whole scene)"
    )
    part_overlap: float = option(0.5, "a mask with this share of its area inside the object is a part of it")
    dilate_fraction: float = option(0.02, "grow the removed region by this fraction of the image side (halo)")
    fallback_box_fraction: float = option(0.5, "side of the centre box removed when SAM gives no mask")
    fill: str = option(
        "blur",
        "how removed pixels are filled: blur (diffuse kept colours in) or mean",
        choices=("blur", "mean"),
    )
    device: str = option("auto", "torch device; auto = cuda if available else cpu")
