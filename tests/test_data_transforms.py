"""Transforms: shapes, normalisation, eval crop against the HF processor, RandomResizedCrop."""

import math

import numpy as np
import pytest
from PIL import Image

from align_jax.data import randaugment, transforms

import helpers_data as hd

MEAN = (0.5, 0.25, 0.75)
STD = (0.2, 0.4, 0.1)


def _pil(index=0, width=40, height=30):
  return Image.fromarray(hd.pattern_array(index, width, height))


def test_normalize_matches_formula():
  pixels = np.array([[[0, 128, 255]]], np.uint8)
  got = transforms.normalize(pixels, MEAN, STD)
  want = (np.array([0, 128, 255]) / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
  assert got.dtype == np.float32


@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (17, 17), (100, 20), (38, 32),
                                          (32, 38)])
def test_eval_transform_equals_hf_image_processor(width, height):
  """The evaluation crop is the HF processors' (38 x 32: torchvision's rounding would differ)."""
  import transformers
  image = _pil(1, width, height)
  size = 16
  got = transforms.make_image_transform(size, train=False, mean=MEAN, std=STD)(image, None)
  processor = transformers.BitImageProcessor(
      size={"shortest_edge": size}, crop_size=size, resample=Image.Resampling.BICUBIC,
      image_mean=list(MEAN), image_std=list(STD))
  ref = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  assert got.shape == ref.shape == (size, size, 3)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  if (width, height) == (38, 32):  # resized to 19 x 16: a margin of 3, cut 1 | 2 (HF), not 2 | 1
    resized = image.resize((19, 16), Image.Resampling.BICUBIC)
    torchvision_crop = np.asarray(resized.crop((2, 0, 18, 16)), np.float64)
    torchvision_crop = (torchvision_crop / 255.0 - np.array(MEAN)) / np.array(STD)
    assert np.abs(got - torchvision_crop).max() > 0.1


def test_constant_image_normalises_to_known_values():
  image = Image.new("RGB", (50, 37), (51, 102, 204))
  want = (np.array([51, 102, 204]) / 255.0 - np.array(MEAN)) / np.array(STD)
  for train, aug in ((False, False), (True, False)):
    out = transforms.make_image_transform(
        24, train=train, mean=MEAN, std=STD, randaugment=aug)(image, np.random.default_rng(0))
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)


def test_random_resized_crop_box_ranges():
  rng = np.random.default_rng(0)
  width, height = 200, 150
  areas, ratios = [], []
  for _ in range(2000):
    left, top, cw, ch = transforms.random_resized_crop_box(width, height, rng)
    assert 0 <= left and left + cw <= width and 0 <= top and top + ch <= height
    areas.append(cw * ch / (width * height))
    ratios.append(cw / ch)
  areas, ratios = np.array(areas), np.array(ratios)
  # Rounding to whole pixels moves area and ratio by at most ~1-2 %.
  assert areas.min() >= 0.2 * 0.97 and areas.max() <= 1.0
  assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
  assert np.mean(np.log(ratios)) == pytest.approx(0.0, abs=0.05)  # Log-uniform, symmetric.
  # Square crops of a square image always fit: the area fraction is then exactly U(0.2, 1).
  square = [transforms.random_resized_crop_box(200, 200, rng, ratio=(1.0, 1.0))
            for _ in range(2000)]
  fractions = np.array([cw * ch / 200**2 for _, _, cw, ch in square])
  assert all(cw == ch for _, _, cw, ch in square)
  assert fractions.mean() == pytest.approx(0.6, abs=0.02)
  assert np.quantile(fractions, 0.25) == pytest.approx(0.4, abs=0.03)


def test_random_resized_crop_fallback_is_centre_crop():
  # A 1000x10 strip: no crop with ratio <= 4/3 and area >= 20 % fits, so the fallback is used.
  box = transforms.random_resized_crop_box(1000, 10, np.random.default_rng(0))
  assert box == ((1000 - 13) // 2, 0, 13, 10)


def test_train_transform_equals_reference_crop_and_flip():
  image = _pil(3, 60, 45)
  transform = transforms.make_image_transform(20, train=True, mean=MEAN, std=STD)
  flips = set()
  for seed in range(8):
    got = transform(image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)  # Replays the same draws as the transform.
    left, top, cw, ch = transforms.random_resized_crop_box(60, 45, rng)
    ref = image.resize((20, 20), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    flip = rng.random() < 0.5
    flips.add(flip)
    ref = np.asarray(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ref, np.float64)
    np.testing.assert_allclose(got, (ref / 255 - np.array(MEAN)) / np.array(STD), atol=1e-5)
  assert flips == {True, False}


def test_train_transform_is_deterministic_given_generator():
  image = _pil(4, 64, 48)
  transform = transforms.make_image_transform(32, train=True, randaugment=True)
  a = transform(image, np.random.default_rng(7))
  b = transform(image, np.random.default_rng(7))
  c = transform(image, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_randaugment_magnitudes_match_torchvision_table():
  # torchvision RandAugment(num_magnitude_bins=31), bin 7.
  assert randaugment.op_magnitude("shear_x", 7, 331, 331) == pytest.approx(0.07)
  assert randaugment.op_magnitude("translate_x", 7, 331, 100) == pytest.approx(35.0)
  assert randaugment.op_magnitude("rotate", 7, 10, 10) == pytest.approx(7.0)
  assert randaugment.op_magnitude("brightness", 7, 10, 10) == pytest.approx(0.21)
  assert randaugment.op_magnitude("posterize", 7, 10, 10) == 7.0
  assert randaugment.op_magnitude("solarize", 7, 10, 10) == pytest.approx(255 * 23 / 30)


def test_randaugment_ops_act_as_defined():
  arr = hd.pattern_array(5, 32, 32)
  image = Image.fromarray(arr)
  np.testing.assert_array_equal(np.asarray(randaugment.apply_op(image, "identity", 0)), arr)
  np.testing.assert_array_equal(
      np.asarray(randaugment.apply_op(image, "solarize", 128)),
      np.where(arr >= 128, 255 - arr, arr))
  np.testing.assert_array_equal(
      np.asarray(randaugment.apply_op(image, "posterize", 4)), arr & 0xF0)
  shifted = np.asarray(randaugment.apply_op(image, "translate_x", 5))
  np.testing.assert_array_equal(shifted[:, 5:], arr[:, :-5])
  np.testing.assert_array_equal(shifted[:, :5], 0)
  assert randaugment.rand_augment(image, np.random.default_rng(0), num_ops=0) is image
  for op in randaugment.OPS:  # Every op keeps the size and mode.
    out = randaugment.apply_op(image, op, randaugment.op_magnitude(op, 7, 32, 32))
    assert out.size == image.size and out.mode == "RGB"


def test_bad_transform_arguments_raise():
  with pytest.raises(ValueError, match="image_size"):
    transforms.make_image_transform(0, train=True)
  with pytest.raises(ValueError, match="std"):
    transforms.make_image_transform(8, train=True, std=(0.1, 0.0, 0.1))
  with pytest.raises(ValueError, match="scale"):
    transforms.make_image_transform(8, train=True, scale=(0.5, 0.2))
  with pytest.raises(ValueError, match="magnitude"):
    randaugment.rand_augment(_pil(), np.random.default_rng(0), magnitude=31)
  assert math.isclose(transforms.IMAGENET_MEAN[0], 0.485)
