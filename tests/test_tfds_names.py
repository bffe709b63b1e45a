"""A mistyped TFDS name: one line with the closest registered names, not ~250 of them."""

import pytest

pytest.importorskip("tensorflow_datasets")

from align_jax.data import tfds_manifest_readers as sources# noqa: E402
from align_jax.evaluate import datasets  # noqa: E402


def test_mistyped_caption_set_gets_did_you_mean(tmp_path):
  with pytest.raises(ValueError) as error:
    sources.TfdsReader("coco_captionz", split="test", data_dir=str(tmp_path))
  message = str(error.value)
  assert "\n" not in message and len(message) < 300, message
  assert message.startswith("no TFDS dataset named 'coco_captionz' (data.name); did you mean "
                            "'coco_captions'?")


def test_mistyped_classification_set_and_a_name_close_to_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^no TFDS dataset named 'oxford_iiit_pets' "
                                              r"\(data.name\); did you mean 'oxford_iiit_pet'"):
    datasets.TfdsClassificationReader("oxford_iiit_pets", split="test", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"named 'qqqqqqqq' \(data.name\); no registered name is "
                                       r"close to it \(.*lists all \d+\)$"):
    sources.TfdsReader("qqqqqqqq", split="test", data_dir=str(tmp_path))
