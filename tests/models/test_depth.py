"""The depth estimator: a tiny random DPT saved like a real checkpoint, loaded from its local dir only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stylear_core.models.depth import build_depth_estimator, depth_to_image
from stylear_core.testing.tiny_depth import save_tiny_depth_estimator


def scene(size: tuple[int, int], box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (30, 120, 200))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


def test_a_saved_depth_model_loads_from_its_dir_and_maps_each_image_at_its_size(tmp_path):
    path = save_tiny_depth_estimator(tmp_path / "dpt", seed=0)
    estimator = build_depth_estimator(path)
    assert type(estimator.model).__name__ == "DPTForDepthEstimation"
    images = [
        scene((64, 64), (8, 8, 30, 30), (250, 220, 0)),
        scene((64, 64), (30, 20, 60, 60), (250, 0, 90)),
        scene((96, 48), (10, 10, 40, 40), (0, 0, 0)),  # another size: its own forward pass
    ]
    maps = estimator(images)
    assert [m.size for m in maps] == [im.size for im in images]
    for m in maps:
        pixels = np.asarray(m)
        assert m.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()  # grey
        assert pixels.min() == 0 and pixels.max() == 255  # stretched to the full range
    assert not np.array_equal(np.asarray(maps[0]), np.asarray(maps[1]))  # the map follows the image
    again = build_depth_estimator(path)(images[:1])[0]
    assert np.array_equal(np.asarray(again), np.asarray(maps[0]))  # same weights, same map


def test_no_path_means_no_estimator_and_a_missing_dir_is_not_downloaded(tmp_path):
    assert build_depth_estimator(None) is None and build_depth_estimator("") is None
    with pytest.raises(FileNotFoundError, match="no depth estimator"):
        build_depth_estimator(tmp_path / "Intel-dpt-large")


def test_depth_maps_put_near_bright_and_a_flat_map_stays_black():
    import torch

    depth = torch.tensor([[0.0, 1e-9], [2e-9, 4e-9]])  # a random model's tiny spread still spans 0..255
    assert np.asarray(depth_to_image(depth))[..., 0].tolist() == [[0, 64], [128, 255]]
    assert np.asarray(depth_to_image(torch.full((2, 2), 3.0))).max() == 0
