"""The Python API: a trained detector, called on images, answering boxes in the images' own pixels.

  import conddetr_jax
  detector = conddetr_jax.load_detector("demo", "/tmp/conddetr_demo")
  boxes, scores, labels = detector("photo.jpg")
  maps = detector.attention("photo.jpg")  # where each detection's query looked, per head

The detections are predict.py's (``coco_eval.detect_image``): the same resizing, model and
post-processing; the weights are read as eval.py reads them (``weights.load_variables``).
"""

import importlib
import importlib.util
import os
from typing import Any, NamedTuple, Sequence

from conddetr_jax import cli

# The console as quiet as the commands': TensorFlow's and XLA's C++ notices silenced before they
# load (the Python API has no -v flag; a program that loaded them first keeps its own settings).
cli.quiet_native_logs([])

# pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np
from PIL import Image

from conddetr_jax import configs, models, visualize
from conddetr_jax.checkpoints import weights
from conddetr_jax.data import image_files
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.inference import attention_maps, prediction

# pylint: enable=g-import-not-at-top,wrong-import-position

# One image: a file path, a PIL image, or (h, w, 3) uint8 RGB pixels.
ImageLike = str | os.PathLike | Image.Image | np.ndarray


class Detections(NamedTuple):
  """One image's detections scoring at least the detector's threshold, best first.

  Attributes:
    boxes: (K, 4) float32 absolute xyxy in the image's own pixels.
    scores: (K,) float32, decreasing.
    labels: (K,) int32 category ids (``Detector.class_names`` names them).
  """

  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray


def get_config(config: str | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run config from a name of ``configs.NAMES`` (the package's configs/), a config file's path,
  or a ``ConfigDict`` (returned as is).

  Raises:
    ValueError: a name that is neither a known config nor an existing ``.py`` file.
  """
  if isinstance(config, ml_collections.ConfigDict):
    return config
  if config in configs.NAMES:
    return importlib.import_module(f"conddetr_jax.configs.{config}").get_config()
  if not (config.endswith(".py") and os.path.isfile(config)):
    raise ValueError(
      f"config {config!r}: expected one of {', '.join(configs.NAMES)} or a config file (.py)"
    )
  spec = importlib.util.spec_from_file_location(
    os.path.splitext(os.path.basename(config))[0], config
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class Detector:
  """A model with its weights; ``detector(image)`` gives its ``Detections``.

  Each new padded image size compiles the model once (seconds on a CPU); later images of that
  size reuse it.

  Attributes:
    config: the run config the model was built from.
    class_names: category id -> name (the dataset's json when at hand, else COCO's for a 91-class
      model, else empty); ``label_name`` names any label.
    threshold: the lowest score returned.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: Any, threshold: float):
    """Wraps ``variables`` (``{'params', 'batch_stats'}``) of ``config``'s model; see
    ``load_detector``."""
    self.config = config
    self.threshold = threshold
    self.class_names = prediction.class_names(config)
    self._model = models.build_model(config)
    self._variables = variables

  def label_name(self, label: int) -> str:
    """The class name of a category id (``class <id>`` when the dataset names none), as drawn."""
    return visualize.class_name(int(label), self.class_names)

  def _prepare(self, image: ImageLike) -> image_files.LoadedImage:
    if isinstance(image, (str, os.PathLike)):
      pixels = image_files.read_image(os.fspath(image))
    elif isinstance(image, Image.Image):
      pixels = np.asarray(image.convert("RGB"), np.uint8)
    else:
      pixels = np.asarray(image)
      if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
          f"an image array must be (h, w, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}"
        )
    return image_files.prepare_image(pixels, self.config)

  def _detect(self, image: ImageLike) -> Detections:
    loaded = self._prepare(image)
    dets = coco_eval.detect_image(
      self._variables, loaded, model=self._model, k=coco_eval.top_k(self.config)
    )
    keep = dets["scores"] >= self.threshold
    return Detections(
      boxes=dets["boxes"][keep].astype(np.float32),
      scores=dets["scores"][keep].astype(np.float32),
      labels=dets["labels"][keep].astype(np.int32),
    )

  def __call__(self, images: ImageLike | Sequence[ImageLike]) -> Detections | list[Detections]:
    """The detections of one image, or a list of them for a list (or tuple) of images.

    Raises:
      FileNotFoundError, ValueError: a missing or unreadable file, or an array that is not an image.
    """
    if isinstance(images, (list, tuple)):
      return [self._detect(image) for image in images]
    return self._detect(images)

  def attention(self, image: ImageLike, layer: int = -1) -> list[attention_maps.DetectionAttention]:
    """For each detection of ``image`` scoring at least the threshold (best first), its query's
    cross-attention in decoder ``layer`` (default the last): per head, the spatial, content and
    combined weights on the feature cells, ``.maps(part)`` over the image's pixels, the reference
    point (``attention_maps.DetectionAttention``); ``attention_maps.write_files`` draws them.

    Raises:
      FileNotFoundError, ValueError: as ``__call__``; a layer the decoder does not have.
    """
    return attention_maps.detection_attention(
      self._model,
      self._variables,
      self._prepare(image),
      k=coco_eval.top_k(self.config),
      threshold=self.threshold,
      layer=layer,
    )


def load_detector(
  config: str | ml_collections.ConfigDict, checkpoint: str, threshold: float | None = None
) -> Detector:
  """A trained detector, ready to call on images.

  Args:
    config: the model's config: a name (``"r50"``, ``"demo"``, ... as in configs/), a config file,
      or a ``ConfigDict``; it must be the checkpoint's model.
    checkpoint: anything eval.py's ``--checkpoint`` takes: a training workdir, a step folder, an
      Orbax checkpoint, the original's ``.pth`` or HF weights.
    threshold: the lowest score returned; default the config's ``evaluation.score_threshold``.

  Raises:
    FileNotFoundError: no checkpoint at ``checkpoint``.
    ValueError: an unknown config, or a checkpoint that does not fit its model.
  """
  config = get_config(config)
  with cli.expected_warnings_hidden():  # Orbax's notes on a training workdir read like errors
    variables, _ = weights.load_variables(config, checkpoint)
  return Detector(
    config, variables, config.evaluation.score_threshold if threshold is None else threshold
  )
