"""The procedural dSprites-style data set: factor grid, index order, and the rendered geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ae_lab.data import shapes

SQUARE, ELLIPSE, HEART = 0, 1, 2


def tuples(rows: list[tuple[int, ...]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def centre_of_mass(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of each image's lit pixels, in pixel coordinates (pixel j's centre at j + 0.5)."""
    grid = torch.arange(shapes.IMAGE_SIZE, dtype=torch.float64) + 0.5
    mass = images[:, 0].double()
    total = mass.sum(dim=(1, 2))
    return (mass.sum(dim=1) @ grid) / total, (mass.sum(dim=2) @ grid) / total


def pixel_counts(classes: torch.Tensor) -> torch.Tensor:
    return shapes.render(classes).sum(dim=(1, 2, 3))


def random_classes(n: int, seed: int) -> torch.Tensor:
    index = torch.randint(0, shapes.NUM_IMAGES, (n,), generator=torch.Generator().manual_seed(seed))
    return shapes.index_to_classes(index)


def test_factor_grid_is_dsprites():
    assert shapes.FACTOR_NAMES == ("color", "shape", "scale", "orientation", "pos_x", "pos_y")
    assert shapes.FACTOR_SIZES == (1, 3, 6, 40, 32, 32)
    assert shapes.NUM_IMAGES == math.prod(shapes.FACTOR_SIZES) == 737_280


def test_index_order_is_row_major_with_last_factor_fastest():
    everything = shapes.index_to_classes(torch.arange(shapes.NUM_IMAGES))
    product = torch.cartesian_prod(*(torch.arange(size) for size in shapes.FACTOR_SIZES))
    assert torch.equal(everything, product)
    assert torch.equal(shapes.classes_to_index(product), torch.arange(shapes.NUM_IMAGES))


def test_single_steps_of_the_index_change_one_factor():
    first = shapes.index_to_classes(torch.tensor([0]))[0]
    assert first.tolist() == [0] * 6
    last = shapes.index_to_classes(torch.tensor([shapes.NUM_IMAGES - 1]))[0]
    assert last.tolist() == [size - 1 for size in shapes.FACTOR_SIZES]
    steps = {"pos_y": 1, "pos_x": 32, "orientation": 32 * 32, "scale": 40 * 32 * 32,
             "shape": 6 * 40 * 32 * 32}
    for name, index in steps.items():
        classes = shapes.index_to_classes(torch.tensor([index]))[0]
        expected = [0] * 6
        expected[shapes.FACTOR_NAMES.index(name)] = 1
        assert classes.tolist() == expected, name


def test_round_trip_on_random_and_extreme_indices():
    index = torch.cat([torch.tensor([0, 1, shapes.NUM_IMAGES - 2, shapes.NUM_IMAGES - 1]),
                       torch.randint(0, shapes.NUM_IMAGES, (10_000,),
                                     generator=torch.Generator().manual_seed(0))])
    classes = shapes.index_to_classes(index)
    assert classes.shape == (len(index), 6) and classes.dtype == torch.long
    assert ((classes >= 0) & (classes < torch.tensor(shapes.FACTOR_SIZES))).all()
    assert torch.equal(shapes.classes_to_index(classes), index)


@pytest.mark.parametrize("bad", [[-1], [shapes.NUM_IMAGES]])
def test_index_out_of_range_is_refused(bad):
    with pytest.raises(ValueError):
        shapes.index_to_classes(torch.tensor(bad))


@pytest.mark.parametrize("bad", [[0, 3, 0, 0, 0, 0], [0, 0, 0, 0, -1, 0], [1, 0, 0, 0, 0, 0]])
def test_classes_out_of_range_are_refused(bad):
    for function in (shapes.classes_to_index, shapes.factor_values, shapes.render):
        with pytest.raises(ValueError):
            function(tuples([bad]))


def test_factor_values_are_the_specified_grids():
    classes = shapes.index_to_classes(torch.arange(shapes.NUM_IMAGES))
    values = shapes.factor_values(classes)
    assert values.shape == (shapes.NUM_IMAGES, 6) and values.dtype == torch.float32
    expected = [np.ones(1), np.array([1.0, 2.0, 3.0]), np.linspace(0.5, 1.0, 6),
                np.linspace(0, 2 * np.pi, 40, endpoint=False),
                np.linspace(0.0, 1.0, 32), np.linspace(0.0, 1.0, 32)]
    for k, grid in enumerate(expected):
        np.testing.assert_allclose(values[:, k].numpy(), grid[classes[:, k].numpy()],
                                   rtol=1e-6, atol=1e-7, err_msg=shapes.FACTOR_NAMES[k])
    # endpoint=False: the last orientation is one step short of a full turn
    assert values[:, 3].max().item() == pytest.approx(2 * math.pi * 39 / 40)


def test_render_gives_binary_float_images_deterministically():
    classes = random_classes(500, seed=1)
    images = shapes.render(classes)
    assert images.shape == (500, 1, 64, 64) and images.dtype == torch.float32
    assert set(images.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(images, shapes.render(classes))


def test_an_image_does_not_depend_on_its_batch():
    classes = random_classes(5000, seed=2)  # more than one internal chunk
    images = shapes.render(classes)
    for i in (0, 17, 4095, 4096, 4999):
        assert torch.equal(images[i], shapes.render(classes[i:i + 1])[0])
    assert torch.equal(images[4000:4200], shapes.render(classes[4000:4200]))


def reference_level(classes: torch.Tensor) -> np.ndarray:
    """The documented geometry on the whole canvas in float64: (N, 64, 64), <= 0 inside the shape."""
    values = shapes.factor_values(classes).double().numpy()
    scale, angle = values[:, 2, None, None], values[:, 3, None, None]
    span = shapes.IMAGE_SIZE - 2 * shapes.MARGIN
    centre_x = (shapes.MARGIN + values[:, 4] * span)[:, None, None]
    centre_y = (shapes.MARGIN + values[:, 5] * span)[:, None, None]
    pixel = np.arange(shapes.IMAGE_SIZE) + 0.5
    dx = pixel[None, None, :] - centre_x
    dy = centre_y - pixel[None, :, None]  # y up
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / scale
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / scale
    a, b = shapes.ELLIPSE_SEMI_AXES
    square = np.maximum(np.abs(u), np.abs(v)) / shapes.SQUARE_HALF_SIDE - 1
    ellipse = (u / a) ** 2 + (v / b) ** 2 - 1
    x, y = u / shapes.HEART_UNIT, v / shapes.HEART_UNIT + shapes.HEART_CENTRE_Y
    heart = (x**2 + y**2 - 1) ** 3 - x**2 * y**3
    return np.choose(classes[:, 1].numpy()[:, None, None], [square, ellipse, heart])


def test_render_matches_the_documented_geometry():
    # the largest shapes at every position (x and y together, to save time)
    largest = tuples([(0, shape, 5, orientation, position, position) for shape in range(3)
                      for orientation in (0, 5, 13, 27) for position in range(32)])
    classes = torch.cat([largest, random_classes(400, seed=4)])
    images = shapes.render(classes)[:, 0].numpy()
    level = reference_level(classes)
    # float32 rendering may go either way only for pixel centres (almost) on an outline
    assert (images[level < -1e-4] == 1).all()
    assert (images[level > 1e-4] == 0).all()


def test_every_shape_is_non_empty_and_inside_the_canvas():
    extremes = tuples([(0, shape, scale, orientation, x, y)
                       for shape in range(3) for scale in (0, 5) for orientation in range(0, 40, 3)
                       for x in (0, 31) for y in (0, 31)])
    classes = torch.cat([extremes, random_classes(3000, seed=3)])
    images = shapes.render(classes)[:, 0]
    assert (images.sum(dim=(1, 2)) > 0).all()
    # the margin leaves the outer two rows and columns empty
    inner = torch.zeros(64, 64, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    assert images[:, ~inner].sum() == 0


@pytest.mark.parametrize("shape", [SQUARE, ELLIPSE, HEART])
def test_pos_x_moves_the_shape_along_x_only(shape):
    classes = tuples([(0, shape, 5, 7, x, 10) for x in range(32)])
    x, y = centre_of_mass(shapes.render(classes))
    assert (x.diff() > 0).all()
    assert x[-1] - x[0] == pytest.approx(64 - 2 * shapes.MARGIN, abs=1.0)
    assert (y - y.mean()).abs().max() < 0.5


@pytest.mark.parametrize("shape", [SQUARE, ELLIPSE, HEART])
def test_pos_y_moves_the_shape_down_the_rows(shape):
    classes = tuples([(0, shape, 5, 7, 20, y) for y in range(32)])
    x, y = centre_of_mass(shapes.render(classes))
    assert (y.diff() > 0).all()
    assert (x - x.mean()).abs().max() < 0.5


def test_centre_follows_the_documented_margin():
    positions = torch.arange(0, 32, 5)
    classes = tuples([(0, shape, 5, 0, int(p), int(q))
                      for shape in (SQUARE, ELLIPSE) for p in positions for q in positions])
    x, y = centre_of_mass(shapes.render(classes))
    expected = shapes.MARGIN + classes[:, 4:].double() / 31 * (64 - 2 * shapes.MARGIN)
    assert torch.allclose(x, expected[:, 0], atol=0.5)
    assert torch.allclose(y, expected[:, 1], atol=0.5)


@pytest.mark.parametrize("shape", [SQUARE, ELLIPSE, HEART])
@pytest.mark.parametrize("orientation", [0, 13])
def test_larger_scale_means_more_pixels(shape, orientation):
    counts = pixel_counts(tuples([(0, shape, scale, orientation, 11, 19) for scale in range(6)]))
    assert (counts.diff() > 0).all()


def test_square_looks_the_same_after_a_quarter_turn():
    classes = tuples([(0, SQUARE, scale, orientation, x, y) for scale in (0, 3, 5)
                      for orientation in (0, 4, 7) for x in (0, 9, 31) for y in (2, 30)])
    turned = classes.clone()
    turned[:, 3] += 10
    difference = (shapes.render(classes) - shapes.render(turned)).abs().sum(dim=(1, 2, 3))
    assert difference.max() <= 3
    # while a turn by 45 degrees does change it
    turned[:, 3] = classes[:, 3] + 5
    difference = (shapes.render(classes) - shapes.render(turned)).abs().sum(dim=(1, 2, 3))
    assert difference.min() > 10


def test_a_small_turn_changes_the_ellipse():
    classes = tuples([(0, ELLIPSE, 5, orientation, x, y)
                      for orientation in range(40) for x in (0, 15) for y in (4, 31)])
    turned = classes.clone()
    turned[:, 3] = (classes[:, 3] + 1) % 40
    difference = (shapes.render(classes) - shapes.render(turned)).abs().sum(dim=(1, 2, 3))
    assert difference.min() >= 10


def test_ellipse_is_long_along_x_at_orientation_zero():
    image = shapes.render(tuples([(0, ELLIPSE, 5, 0, 16, 16)]))[0, 0]
    width = image.any(dim=0).sum().item()
    height = image.any(dim=1).sum().item()
    assert width == pytest.approx(2 * shapes.ELLIPSE_SEMI_AXES[0], abs=1)
    assert height == pytest.approx(2 * shapes.ELLIPSE_SEMI_AXES[1], abs=1)


def test_heart_is_upright_at_orientation_zero():
    image = shapes.render(tuples([(0, HEART, 5, 0, 16, 16)]))[0, 0]
    rows = image.sum(dim=1)
    lit = rows.nonzero().squeeze(1)
    top, bottom = rows[lit[0]:lit[0] + 5], rows[lit[-1] - 4:lit[-1] + 1]
    assert top.sum() > bottom.sum()  # wide lobes above, the point below
    # the cleft between the lobes: the top row's lit pixels are not one run
    assert (image[lit[0]].diff() != 0).sum() >= 4


def test_the_three_shapes_differ():
    others = [(scale, orientation, x, y) for scale in (0, 5) for orientation in (0, 9)
              for x, y in ((0, 0), (20, 7))]
    for scale, orientation, x, y in others:
        images = shapes.render(tuples([(0, shape, scale, orientation, x, y) for shape in range(3)]))
        for a, b in ((0, 1), (0, 2), (1, 2)):
            assert not torch.equal(images[a], images[b])


@pytest.mark.parametrize("scale", [0, 2, 5])
def test_areas_match_the_continuous_shapes(scale):
    factor = shapes.factor_values(tuples([(0, 0, scale, 0, 0, 0)]))[0, 2].item()
    classes = tuples([(0, ELLIPSE, scale, orientation, x, y)
                      for orientation in range(0, 40, 3) for x in (0, 13, 31) for y in (5, 22)])
    a, b = shapes.ELLIPSE_SEMI_AXES
    ellipse = pixel_counts(classes)
    assert torch.allclose(ellipse, torch.full_like(ellipse, math.pi * a * b * factor**2), rtol=0.1)
    classes[:, 1] = SQUARE
    square = pixel_counts(classes)
    side = 2 * shapes.SQUARE_HALF_SIDE * factor
    assert torch.allclose(square, torch.full_like(square, side**2), rtol=0.15)


def test_shapes_data_module_serves_rendered_images_with_their_factors(compose_config):
    from ae_lab.data import build_datamodule

    cfg = compose_config(["dataset=shapes", "dataset.subsample=1000"]).dataset
    data = build_datamodule(cfg)
    assert sum(len(split) for split in data.splits.values()) == 1000
    assert data.input_shape == (1, 64, 64)
    split = data.splits["val"]
    batch = split.batch(torch.arange(16))
    classes = batch["factor_classes"]
    assert torch.equal(batch["x"], shapes.render(classes))
    assert torch.allclose(batch["factors"], shapes.factor_values(classes))
    again = build_datamodule(cfg)
    assert torch.equal(again.splits["val"].batch(torch.arange(16))["x"], batch["x"])
    assert again.checksum == data.checksum
    reseeded = build_datamodule(compose_config(["dataset=shapes", "dataset.subsample=1000",
                                                "dataset.split_seed=1"]).dataset)
    assert reseeded.checksum != data.checksum


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_models_train_on_shapes(arch, tmp_path, quick, train_in_process):
    """A smoke test: both architectures train on the shapes images and report a finite loss (the images
    themselves are checked above)."""
    metrics = train_in_process(["dataset=shapes", "dataset.subsample=500", f"model.arch={arch}",
                                *quick, "logger=none"], tmp_path)
    assert np.isfinite(metrics["test/loss"])
