"""Post-processing: top-k (query, class) pairs as absolute xyxy boxes, like the original."""

import jax
import numpy as np

from conddetr_jax.evaluation.postprocess import postprocess


def _reference(logits, boxes, sizes, top_k):
  """Direct numpy version of the original's PostProcess; also returns each detection's query."""
  batch, _, classes = logits.shape
  prob = 1 / (1 + np.exp(-logits.astype(np.float64).reshape(batch, -1)))
  index = np.argsort(-prob, axis=1, kind="stable")[:, :top_k]
  scores = np.take_along_axis(prob, index, axis=1)
  query, labels = index // classes, index % classes
  out = []
  for b in range(batch):
    cx, cy, w, h = boxes[b, query[b]].T
    h_img, w_img = sizes[b]
    out.append(
      np.stack(
        [(cx - w / 2) * w_img, (cy - h / 2) * h_img, (cx + w / 2) * w_img, (cy + h / 2) * h_img], -1
      )
    )
  return scores, labels, np.stack(out), query


def test_postprocess_matches_direct_implementation():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (3, 20, 7)).astype(np.float32)
  boxes = rng.uniform(0.1, 0.9, (3, 20, 4)).astype(np.float32)
  sizes = np.array([[480, 640], [800, 1199], [333, 500]], np.int32)
  dets = jax.jit(postprocess, static_argnames="top_k")(
    {"pred_logits": logits, "pred_boxes": boxes}, sizes, top_k=30
  )
  scores, labels, xyxy, _ = _reference(logits, boxes, sizes, 30)
  np.testing.assert_allclose(dets["scores"], scores, rtol=1e-6)
  np.testing.assert_array_equal(dets["labels"], labels)
  np.testing.assert_allclose(dets["boxes"], xyxy, rtol=1e-5, atol=1e-3)
  assert (np.diff(np.asarray(dets["scores"]), axis=1) <= 0).all()
  assert dets["labels"].dtype == np.int32 and dets["boxes"].shape == (3, 30, 4)


def test_one_query_can_yield_several_labels():
  logits = np.full((1, 2, 3), -10.0, np.float32)
  logits[0, 1, [0, 2]] = [5.0, 4.0]  # Query 1 is confident about classes 0 and 2.
  boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0]]], np.float32)
  dets = postprocess({"pred_logits": logits, "pred_boxes": boxes}, np.array([[100, 200]]), top_k=2)
  np.testing.assert_array_equal(dets["labels"], [[0, 2]])
  np.testing.assert_allclose(dets["boxes"], [[[0, 0, 100, 100]] * 2], atol=1e-4)


def test_with_queries_each_detection_names_the_query_that_made_it():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (2, 20, 7)).astype(np.float32)
  boxes = rng.uniform(0.1, 0.9, (2, 20, 4)).astype(np.float32)
  out = {"pred_logits": logits, "pred_boxes": boxes}
  sizes = np.array([[480, 640], [333, 500]], np.int32)
  dets = postprocess(out, sizes, top_k=30, with_queries=True)
  np.testing.assert_array_equal(dets["queries"], _reference(logits, boxes, sizes, 30)[3])
  assert dets["queries"].dtype == np.int32
  assert "queries" not in postprocess(out, sizes, top_k=30)  # the evaluation's outputs as before
