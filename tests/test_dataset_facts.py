"""The data-set facts the config checks use live with their data sets (ae_lab/data/*) and are true of
the data: each is checked against the data themselves or a count by hand, and the check's refusal
names it as before."""

from __future__ import annotations

import gzip
import struct

import pytest
from sklearn.datasets import load_digits

from ae_lab.checks import validate
from ae_lab.compose import compose_config
from ae_lab.data import digits, mnist, shapes
from ae_lab.errors import ConfigError
from paths import SHARED, needs_shared


@needs_shared
def test_val_size_is_bounded_by_the_training_images_in_the_mnist_files():
    for name in ("mnist", "fashion_mnist"):
        with gzip.open(SHARED / name / "train-images-idx3-ubyte.gz") as file:
            magic, count = struct.unpack(">II", file.read(8))  # the IDX header: magic number, image count
        assert (magic, count) == (2051, mnist.TRAIN_IMAGES)
    validate(compose_config(["dataset=mnist", f"dataset.val_size={mnist.TRAIN_IMAGES - 1}"]))
    with pytest.raises(ConfigError, match=r"^dataset.val_size=60000 is not allowed: between 1 and 59,999 of "
                                          r"the 60,000 training images$"):
        validate(compose_config(["dataset=mnist", "dataset.val_size=60000"]))


def test_a_held_out_class_is_one_of_the_digits_classes():
    assert sorted(set(load_digits().target.tolist())) == list(digits.CLASSES)
    validate(compose_config(["dataset=digits", "dataset.held_out_class=9"]))
    with pytest.raises(ConfigError, match=r"^dataset.held_out_class=10 is not allowed: null or a class label 0-9 "):
        validate(compose_config(["dataset=digits", "dataset.held_out_class=10"]))


def test_a_shapes_subsample_is_at_most_the_whole_factor_grid():
    assert shapes.NUM_IMAGES == 1 * 3 * 6 * 40 * 32 * 32  # colour, shape, scale, orientation, x, y
    validate(compose_config(["dataset=shapes", f"dataset.subsample={shapes.NUM_IMAGES}"]))
    with pytest.raises(ConfigError, match=r"^dataset.subsample=737281 is not allowed: null \(all 737,280 images\) "
                                          r"or an integer in \[10, 737280\]$"):
        validate(compose_config(["dataset=shapes", "dataset.subsample=737281"]))
