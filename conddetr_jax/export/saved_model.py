"""The ``saved_model`` format: a TF SavedModel that detects objects in encoded images.

Its ``serving_default`` signature takes ``images`` (B,) string (JPEG, PNG, BMP, GIF bytes) and
``score_threshold`` () float32; ``detect`` takes ``images`` only and uses the config's threshold
(``evaluation.score_threshold``, also saved as ``default_score_threshold``). Both return
``boxes`` (B, K, 4) float32 xyxy in each image's own pixels, ``scores`` (B, K), ``labels`` (B, K)
int32 and ``num_detections`` (B,) int32: the first ``num_detections`` entries score at least the
threshold, best first; the others are zeros. K is ``evaluation.top_k``. One more signature per
bucket, ``model_<H>x<W>``, is the bare model as the other formats hold it: ``image`` (B, H, W, 3)
float32 normalised, ``pad_mask`` (B, H, W) bool -> ``logits`` (B, Q, C), ``boxes`` (B, Q, 4) cxcywh
in [0, 1] (for clients that prepare their own batches; the tests compare it with the JAX model).

Everything runs in the graph, so TF Serving serves it as is: decoding (libjpeg's accurate IDCT, as
PIL), the original's evaluation resize (PIL-exact bilinear), normalisation, padding each image to
its bucket (``forward.buckets``), the model (``jax2tf``: the StableHLO of ``forward.detect_fn``, for
CPU, CUDA and TPU, batch symbolic; weights as variables) and the original's post-processing (in TF
ops: TF's XlaCallModule reads StableHLO up to v1.13, where JAX's ``top_k`` is newer). A request that
is not images, an empty batch or an image whose resized size exceeds the largest bucket (the
original's resize can overshoot ``eval_max_size`` on thin images) fails with InvalidArgumentError
naming the problem; the server keeps serving.
"""

from typing import Any

from jax.experimental import jax2tf
import ml_collections
import numpy as np
import tensorflow as tf

from conddetr_jax.data import transforms
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.export import forward, stablehlo, verify

OUTPUTS = ("boxes", "scores", "labels", "num_detections")
NOT_CARRIED = (
  "saved_model does not apply EXIF orientation (predict.py does) and decodes CMYK JPEGs "
  "with TF (a grey level from PIL's)"
)


def postprocess(
  logits: tf.Tensor, boxes: tf.Tensor, orig_size: tf.Tensor, top_k: int
) -> dict[str, tf.Tensor]:
  """``postprocess.postprocess`` in TF ops: the top_k (query, class) pairs of each image.

  Args:
    logits: (B, Q, C); boxes: (B, Q, 4) cxcywh in [0, 1]; orig_size: (B, 2) int (h, w).
  Returns:
    ``scores`` (B, top_k) decreasing, ``labels`` (B, top_k) int32, ``boxes`` (B, top_k, 4) xyxy in
    ``orig_size`` pixels.
  """
  num_classes = tf.shape(logits)[-1]
  scores, index = tf.math.top_k(tf.reshape(tf.sigmoid(logits), [tf.shape(logits)[0], -1]), top_k)
  cx, cy, w, h = tf.unstack(boxes, axis=-1)
  xyxy = tf.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
  xyxy = tf.gather(xyxy, index // num_classes, batch_dims=1)
  height, width = tf.unstack(tf.cast(orig_size, tf.float32), axis=-1)
  scale = tf.stack([width, height, width, height], axis=-1)
  return {"scores": scores, "labels": index % num_classes, "boxes": xyxy * scale[:, None, :]}


class Server(tf.Module):
  """The model with its in-graph pre- and post-processing (what the SavedModel holds)."""

  def __init__(self, config: ml_collections.ConfigDict, variables: Any):
    super().__init__()
    weights, treedef = forward.flat_weights(variables)
    self.weights = [tf.Variable(w, trainable=False) for w in weights]
    self.default_score_threshold = tf.Variable(
      float(config.evaluation.score_threshold), trainable=False
    )
    self._eval_size, self._eval_max_size = (
      int(config.dataset.eval_size),
      int(config.dataset.eval_max_size),
    )
    # Smallest first: an image goes to the first bucket it fits.
    self._sizes = sorted(forward.buckets(config), key=lambda s: s[0] * s[1])
    self._envelope = (max(h for h, _ in self._sizes), max(w for _, w in self._sizes))
    self._top_k = coco_eval.top_k(config)
    self._outputs = (
      (config.model.num_queries, config.model.num_classes),
      (config.model.num_queries, 4),
    )
    run = forward.forward_fn(config, treedef)
    # One tf.function per bucket, called by serve and detect too: each program is lowered once.
    self._models = [self._model_function(run, size) for size in self._sizes]

  def _model_function(self, run: forward.Forward, size: tuple[int, int]) -> Any:
    """The bucket ``size``'s program as a tf.function of (image, pad_mask) -> logits, boxes."""
    h, w = size
    program = jax2tf.convert(
      run,
      polymorphic_shapes=[None, f"(b, {h}, {w}, 3)", f"(b, {h}, {w})"],
      native_serialization_platforms=stablehlo.PLATFORMS,
      with_gradient=False,
    )

    @tf.function(
      input_signature=[
        tf.TensorSpec([None, h, w, 3], tf.float32, name="image"),
        tf.TensorSpec([None, h, w], tf.bool, name="pad_mask"),
      ],
      autograph=False,  # see serve
    )
    def model(image: tf.Tensor, pad_mask: tf.Tensor) -> dict[str, tf.Tensor]:
      logits, boxes = program(self.weights, image, pad_mask)
      return {"logits": logits, "boxes": boxes}

    return model

  def signatures(self) -> dict[str, Any]:
    """The SavedModel's signatures by name (module docstring)."""
    models = {f"model_{h}x{w}": m for (h, w), m in zip(self._sizes, self._models)}
    return {"serving_default": self.serve, "detect": self.detect, **models}

  def _prepare(self, contents: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One image's bytes -> (envelope H, W, 3) normalised and zero-padded, (2,) resized (h, w),
    (2,) original (h, w)."""
    pixels = transforms.decode_image(contents, pil_cmyk=False)
    orig = tf.shape(pixels)[:2]
    hw = transforms.eval_resized_size(orig, self._eval_size, self._eval_max_size)
    fits = tf.debugging.assert_less_equal(
      hw,
      tf.constant(self._envelope),
      message=f"an image resized for the model is larger than the largest bucket {self._envelope}"
      " (height, width): an image this thin cannot be served by this export",
    )
    with tf.control_dependencies([fits]):
      hw = tf.identity(hw)
    image = transforms.normalize_image(transforms.resize_image(pixels, hw))
    padding = [[0, self._envelope[0] - hw[0]], [0, self._envelope[1] - hw[1]], [0, 0]]
    return tf.pad(image, padding), hw, orig

  def _run_bucket(self, index: int, image: tf.Tensor, hw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Bucket ``index``'s program on its images (B, envelope, 3) cropped to the bucket: logits
    (B, Q, C) and boxes (B, Q, 4)."""
    h, w = self._sizes[index]
    image = image[:, :h, :w]
    pad_mask = (tf.range(h)[None, :, None] >= hw[:, 0, None, None]) | (
      tf.range(w)[None, None, :] >= hw[:, 1, None, None]
    )
    out = self._models[index](image, pad_mask)
    return out["logits"], out["boxes"]

  def _detect(self, images: tf.Tensor, score_threshold: tf.Tensor) -> dict[str, tf.Tensor]:
    check = tf.debugging.assert_positive(
      tf.size(images), message="expected at least one encoded image, got none"
    )
    with tf.control_dependencies([check]):
      images = tf.identity(images)
    spec = (
      tf.TensorSpec([*self._envelope, 3], tf.float32),
      tf.TensorSpec([2], tf.int32),
      tf.TensorSpec([2], tf.int32),
    )
    padded, hw, orig = tf.map_fn(self._prepare, images, fn_output_signature=spec)
    bucket = tf.fill(tf.shape(images), len(self._sizes))
    for index in reversed(range(len(self._sizes))):  # the smallest fitting bucket wins
      h, w = self._sizes[index]
      bucket = tf.where((hw[:, 0] <= h) & (hw[:, 1] <= w), index, bucket)
    positions, logits, boxes = [], [], []
    for index in range(len(self._sizes)):
      where = tf.cast(tf.where(tf.equal(bucket, index))[:, 0], tf.int32)
      # A bucket without images is skipped: its program is not run on an empty batch.
      out = tf.cond(
        tf.size(where) > 0,
        lambda i=index, at=where: self._run_bucket(i, tf.gather(padded, at), tf.gather(hw, at)),
        lambda: (tf.zeros([0, *self._outputs[0]]), tf.zeros([0, *self._outputs[1]])),
      )
      positions.append(where)
      logits.append(out[0])
      boxes.append(out[1])
    dets = postprocess(
      tf.dynamic_stitch(positions, logits), tf.dynamic_stitch(positions, boxes), orig, self._top_k
    )
    count = tf.reduce_sum(tf.cast(dets["scores"] >= score_threshold, tf.int32), axis=1)
    kept = tf.range(self._top_k)[None, :] < count[:, None]
    return {
      "boxes": tf.where(kept[..., None], dets["boxes"], 0.0),
      "scores": tf.where(kept, dets["scores"], 0.0),
      "labels": tf.where(kept, dets["labels"], 0),
      "num_detections": count,
    }

  # No AutoGraph: the graph's control flow is explicit (tf.cond, tf.map_fn, Python loops over the
  # buckets), and AutoGraph would rewrite every function it reaches, JAX's and Flax's tracing of
  # the model included: that made writing even the test model's SavedModel take minutes.
  @tf.function(
    input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.float32)],
    autograph=False,
  )
  def serve(self, images: tf.Tensor, score_threshold: tf.Tensor) -> dict[str, tf.Tensor]:
    """The detections scoring at least ``score_threshold`` in each encoded image (module
    docstring)."""
    return self._detect(images, score_threshold)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
  def detect(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
    """``serve`` at the config's threshold."""
    return self._detect(images, self.default_score_threshold)


def write(config: ml_collections.ConfigDict, variables: Any, out_dir: str) -> list[str]:
  """Writes the SavedModel into ``out_dir``; returns ``[out_dir]``."""
  server = Server(config, variables)
  tf.saved_model.save(server, out_dir, signatures=server.signatures())
  return [out_dir]


def load(out_dir: str, threshold: float) -> verify.Serve:
  """The written SavedModel's ``serving_default`` as ``f(encoded images) -> (boxes, scores, labels,
  num_detections)`` (numpy), at ``threshold``."""
  loaded = tf.saved_model.load(out_dir)  # the signature holds the variables only weakly

  def serve(encoded: list[bytes]) -> tuple[np.ndarray, ...]:
    out = loaded.signatures["serving_default"](
      images=tf.constant(encoded, tf.string), score_threshold=tf.constant(threshold, tf.float32)
    )
    return tuple(out[name].numpy() for name in OUTPUTS)

  return serve
