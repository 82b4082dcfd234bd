"""Where each detection looked: a decoder layer's cross-attention maps per head, over the image.

Conditional DETR's Figure 1: in the cross-attention, each head's query is [content, conditional
spatial query] and each key [content, position], so a head's logits are the sum of a content part
(q_content . k_content) and a spatial part (q_spatial . k_pos). Shown as a softmax each, the
spatial part picks a band per head around one extremity of the object or an area inside its box;
the content part and the combined weights (what the model attends with) sit beside it.

  dets = detection_attention(model, variables, image_files.load_image(path, config), k=100,
                             threshold=0.5)
  dets[0].maps("spatial")  # (heads, h, w) over the image's own pixels

``write_files`` draws a PNG per detection and keeps the raw maps in an .npz beside it (predict.py
--attention; ``Detector.attention`` in the Python API).
"""

import dataclasses
import functools
import io
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
from matplotlib import figure, patches
from matplotlib.backends import backend_agg
import numpy as np

from conddetr_jax import storage, visualize
from conddetr_jax.data import image_files
from conddetr_jax.evaluation import postprocess

PARTS = ("spatial", "content", "combined")
# Sown names in the recording layer's intermediates (ConditionalDecoderLayer): part -> (logits,
# weights), the combined ones under its ``cross_attn``.
_SOWN = {
  "spatial": ("spatial_logits", "spatial_weights"),
  "content": ("content_logits", "content_weights"),
  "combined": (("cross_attn", "logits"), ("cross_attn", "weights")),
}


@dataclasses.dataclass(frozen=True)
class DetectionAttention:
  """One detection and where its query attended in one decoder layer's cross-attention.

  Attributes:
    box: (4,) float32 xyxy in the image's own pixels.
    score: its score.
    label: its category id.
    query: the decoder query that made it.
    layer: the decoder layer (0-based).
    reference: (2,) float32 the query's reference point (x, y) in the image's own pixels.
    weights: part (``PARTS``) -> (heads, h, w) float32 softmax weights on the valid (unpadded)
      feature cells, each head summing to 1: ``combined`` is what the model attends with,
      ``spatial`` and ``content`` are each part's own softmax.
    logits: part -> (heads, h, w) float32 logits on the same cells; combined = spatial + content.
    image_size: (height, width) of the image.
    cell_size: (height, width) of a feature cell in the image's pixels (the backbone's stride,
      scaled as the image was resized for the model).
  """

  box: np.ndarray
  score: float
  label: int
  query: int
  layer: int
  reference: np.ndarray
  weights: Mapping[str, np.ndarray]
  logits: Mapping[str, np.ndarray]
  image_size: tuple[int, int]
  cell_size: tuple[float, float]

  def maps(self, part: str) -> np.ndarray:
    """(heads, height, width) float32: ``weights[part]`` upsampled over the image's own pixels."""
    return upsample(self.weights[part], self.image_size, self.cell_size)


def upsample(
  cells: np.ndarray, image_size: tuple[int, int], cell_size: tuple[float, float]
) -> np.ndarray:
  """(heads, h, w) values on feature cells -> (heads, height, width) pixels, bilinear.

  Cell (i, j) covers pixels [i, i + 1) x cell height by [j, j + 1) x cell width of the image, its
  value at the centre, so the cells start at the image's top-left corner; the last row and column
  may reach past the image (as the backbone's last stride reaches into the padding): the image
  shows what lies over it, i.e. the maps cropped to the unpadded image.
  """
  out = jax.image.scale_and_translate(
    jnp.asarray(cells, jnp.float32),
    (cells.shape[0],) + tuple(image_size),
    spatial_dims=(1, 2),
    scale=jnp.asarray(cell_size, jnp.float32),
    translation=jnp.zeros(2, jnp.float32),
    method="linear",
    antialias=False,
  )
  return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("model", "k"))
def _forward(
  variables: Any,
  image: jax.Array,
  pad_mask: jax.Array,
  orig_size: jax.Array,
  *,
  model: flax.linen.Module,
  k: int,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The detections (with their queries) and the recording layer's intermediates of one image."""
  out, state = model.apply(variables, image, pad_mask, train=False, mutable=["intermediates"])
  dets = postprocess.postprocess(out, orig_size, top_k=k, with_queries=True)
  sown = state["intermediates"]
  layer = model.cross_attention_layer % model.config.dec_layers
  recorded = sown["decoder"][f"layers_{layer}"]
  # A sown value is a 1-tuple of a (1, ...) array: the one image's.
  pick = lambda name: (recorded[name[0]][name[1]] if isinstance(name, tuple) else recorded[name])[
    0
  ][0]
  parts = {part: (pick(logits), pick(weights)) for part, (logits, weights) in _SOWN.items()}
  return dets, {
    "parts": parts,
    "feature_mask": sown["feature_mask"][0][0],
    "reference": sown["reference_points"][0][0],
  }


def detection_attention(
  model: flax.linen.Module,
  variables: Any,
  loaded: image_files.LoadedImage,
  *,
  k: int,
  threshold: float,
  layer: int = -1,
) -> list[DetectionAttention]:
  """The cross-attention maps of ``layer`` for each detection of one image scoring >= ``threshold``.

  Args:
    model: the conditional detector (``models.build_model``; any ``cross_attention_layer``).
    variables: its ``{'params', 'batch_stats'}``.
    loaded: the image as predict.py prepares it (one image, padded to ``size_divisibility``).
    k: detections considered (``evaluation.top_k``).
    threshold: the lowest score kept.
    layer: the decoder layer (negative: counted from the last).

  Returns:
    One ``DetectionAttention`` per kept detection, best first (a query may make several, with
    different labels).

  Raises:
    ValueError: ``layer`` out of range, or a model whose decoder has no spatial query (DETR's).
  """
  recording = model.clone(cross_attention_layer=layer)
  dets, sown = jax.device_get(
    _forward(variables, loaded.image, loaded.pad_mask, loaded.orig_size, model=recording, k=k)
  )
  valid = ~np.asarray(sown["feature_mask"])  # (h, w): the unpadded image's cells form its top left
  h, w = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
  grid = valid.shape
  height, width = (int(v) for v in loaded.orig_size[0])
  # Pixels of the model's input per cell (its stride), times the original pixels per input pixel.
  unpadded = ~loaded.pad_mask[0]
  resized = (int(unpadded.any(axis=1).sum()), int(unpadded.any(axis=0).sum()))
  cell_size = tuple(
    float(padded / cells * size / r)
    for padded, cells, size, r in zip(loaded.pad_mask.shape[1:], grid, (height, width), resized)
  )
  # (heads, Q, h * w) on the whole grid -> one query's (heads, h, w) on the valid cells.
  on_cells = lambda x, q: np.asarray(x[:, q], np.float32).reshape((-1,) + grid)[:, :h, :w]
  detections = []
  for i in np.flatnonzero(dets["scores"][0] >= threshold):
    q = int(dets["queries"][0, i])
    detections.append(
      DetectionAttention(
        box=np.asarray(dets["boxes"][0, i], np.float32),
        score=float(dets["scores"][0, i]),
        label=int(dets["labels"][0, i]),
        query=q,
        layer=layer % model.config.dec_layers,
        reference=np.asarray(sown["reference"][q], np.float32) * np.float32([width, height]),
        weights={part: on_cells(sown["parts"][part][1], q) for part in PARTS},
        logits={part: on_cells(sown["parts"][part][0], q) for part in PARTS},
        image_size=(height, width),
        cell_size=cell_size,
      )
    )
  return detections


def draw(
  pixels: np.ndarray,
  detection: DetectionAttention,
  class_names: Mapping[int, str],
  tile_inches: float = 1.3,
  dpi: int = 100,
) -> figure.Figure:
  """The figure of one detection: the image with its box and reference point (+), then one row per
  part (spatial, content, combined) of one tile per head, each map over the greyed image (its
  colour scale from 0 to its own maximum).

  Args:
    pixels: (height, width, 3) uint8 RGB, the image of ``detection``.
    detection: from ``detection_attention``.
    class_names: category id -> name.
    tile_inches: the width of a head's tile.
    dpi: pixels per inch of the saved figure.
  """
  heads = detection.weights["combined"].shape[0]
  height, width = pixels.shape[:2]
  half = max(heads // 2, 1)
  # The image spans half the columns over `half` rows' height: every panel keeps its aspect ratio.
  rows = (half,) + (1,) * len(PARTS)
  tile_height = tile_inches * height / width
  fig = figure.Figure(figsize=(tile_inches * heads, tile_height * sum(rows) * 1.12 + 0.3), dpi=dpi)
  backend_agg.FigureCanvasAgg(fig)
  grid = fig.add_gridspec(
    len(rows),
    heads,
    height_ratios=rows,
    left=0.04,
    right=0.99,
    bottom=0.01,
    top=0.97,
    hspace=0.12,
    wspace=0.04,
  )
  grey = np.repeat(np.asarray(pixels, np.float32).mean(axis=-1, keepdims=True), 3, axis=-1) / 255.0

  def mark(ax, colour: str) -> None:
    x0, y0, x1, y1 = detection.box
    ax.add_patch(
      patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1)
    )
    ax.plot(*detection.reference, marker="+", color=colour, markersize=8, markeredgewidth=1.5)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])

  top = fig.add_subplot(grid[0, :half])
  top.imshow(pixels)
  mark(top, "red")
  text = fig.add_subplot(grid[0, half:])
  text.axis("off")
  caption = "\n".join(
    [
      visualize.label_text(detection.label, detection.score, class_names),
      f"query {detection.query}, decoder layer {detection.layer}",
      "",
      "cross-attention weights per head,",
      "each its own softmax over the image:",
      "spatial: spatial query . key positions",
      "content: content query . key content",
      "combined: the model's (their sum)",
      "+: the query's reference point",
    ]
  )
  text.text(0.03, 0.97, caption, va="top", fontsize=8, transform=text.transAxes)
  for row, part in enumerate(PARTS, start=1):
    maps = detection.maps(part)
    for head in range(heads):
      ax = fig.add_subplot(grid[row, head])
      ax.imshow(grey * 0.6)
      ax.imshow(maps[head], cmap="jet", alpha=0.55, vmin=0.0, vmax=float(maps[head].max()) or 1.0)
      mark(ax, "white")
      if row == 1:
        ax.set_title(f"head {head}", fontsize=8)
      if head == 0:
        ax.set_ylabel(part, fontsize=9)
  return fig


def write_files(
  out_dir: str,
  stem: str,
  pixels: np.ndarray,
  detections: list[DetectionAttention],
  class_names: Mapping[int, str],
) -> list[dict[str, str]]:
  """Writes ``out_dir/<stem>_attention_<i>.png`` (``draw``) and ``.npz`` for the i-th detection.

  The .npz holds ``<part>_weights`` and ``<part>_logits`` (heads, h, w) on the valid feature cells
  for each part of ``PARTS``, ``box_xyxy`` and ``reference_xy`` in the image's pixels, ``score``,
  ``label``, ``query``, ``layer`` and ``image_size`` (height, width).

  Returns:
    ``{"png", "npz"}`` paths (as ``storage.display`` shows them), one per detection.
  """
  out = storage.path(out_dir)
  written = []
  for i, det in enumerate(detections):
    png, npz = (os.fspath(out / f"{stem}_attention_{i}.{ext}") for ext in ("png", "npz"))
    fig = draw(pixels, det, class_names)
    storage.save_figure(png, lambda buffer, fig=fig: fig.savefig(buffer, format="png"))
    arrays = {
      f"{part}_{kind}": getattr(det, kind)[part] for part in PARTS for kind in ("weights", "logits")
    }
    buffer = io.BytesIO()
    np.savez_compressed(
      buffer,
      box_xyxy=det.box,
      reference_xy=det.reference,
      score=det.score,
      label=det.label,
      query=det.query,
      layer=det.layer,
      image_size=np.array(det.image_size),
      **arrays,
    )
    storage.write_bytes(npz, buffer.getvalue())
    written.append({"png": storage.display(png), "npz": storage.display(npz)})
  return written
