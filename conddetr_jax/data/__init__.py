"""tf.data input pipeline (the only place that imports TensorFlow).

Public API (see each function's docstring):
  prepare_dataset, num_classes, check_num_classes, category_names, annotation_path  (coco.py)
  train_steps_per_epoch, train_iterator, eval_iterator, eval_steps    (pipeline.py)
  to_global_arrays, prefetch_to_device                                (device.py)
  check_train_resize                                                  (transforms.py)
Batches are dicts of numpy arrays laid out as ``batch_spec`` says.
"""

from conddetr_jax.data.coco import (
  annotation_path,
  category_names,
  check_num_classes,
  num_classes,
  prepare_dataset,
)
from conddetr_jax.data.device import prefetch_to_device, to_global_arrays
from conddetr_jax.data.pipeline import (
  BadImageError,
  DataIterator,
  buckets,
  eval_iterator,
  eval_steps,
  train_iterator,
  train_steps_per_epoch,
)
from conddetr_jax.data.transforms import check_train_resize
