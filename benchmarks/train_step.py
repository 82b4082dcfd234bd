"""Time of one complete train step: forward, matching, loss, backward, clipping, AdamW update.

Usage:
  python benchmarks/train_step.py --config=configs/r50.py --batch=2 --size=384x512
      [--steps=5] [--warmup=2] [--bucket=800x1216] [--bucket_dtypes=float32,bfloat16]
      [--hf=auto|yes|no] [--config.X=...]

Prints, in order: the machine; the step at --size (median after warm-up, compile time, XLA
buffer sizes); images/s and memory at a COCO training bucket (--bucket, '' to skip) in each of
--bucket_dtypes; Hugging Face's ConditionalDetr train step (PyTorch) on the same input and the
ratio (--hf=auto: on CPU only). With the HF step, the two alternate step by step (one JAX step, one
PyTorch step, ...), so that on a shared machine both see the same load and the ratio stays fair.
The last line is ``step_s=<median seconds>`` of the --size step.
Each image gets 7 random boxes (COCO's mean) in max_boxes padded slots, as the pipeline pads them.

With --variant (repeatable; comma-separated config overrides), it instead times the config and
each variant at --size round-robin, one step of each in turn for --rounds rounds, so that on a
shared or loaded machine every variant sees the same load and the ratios stay meaningful:
  python benchmarks/train_step.py --config=configs/demo.py --batch=4 --size=160x192 \
      --variant=model.num_groups=5 --variant=model.dilation=True,model.num_groups=5
"""

import ast
import os
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from benchmarks.synthetic import synthetic_batch
from conddetr_jax import cli, models
from conddetr_jax import sharding
from conddetr_jax.models import backbone as backbone_lib
from conddetr_jax.training import optimizer, parallel
from conddetr_jax.training import state as state_lib
from conddetr_jax.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r50.py", "Model/optimiser config.")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch size.")
_SIZE = flags.DEFINE_string("size", "384x512", "HxW of the padded batch for the step_s figure.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones.")
_BUCKET = flags.DEFINE_string("bucket", "800x1216", "A COCO training bucket HxW for images/s; '' skips it.")
_BUCKET_DTYPES = flags.DEFINE_list("bucket_dtypes", ["float32", "bfloat16"], "Compute dtypes at --bucket.")
_HF = flags.DEFINE_enum("hf", "auto", ["auto", "yes", "no"], "Time HF's PyTorch train step (auto: on CPU).")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "Config overrides 'a.b=value,c=value' to time against the "
                                      "config, round-robin (values are Python literals).")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "With --variant: timed rounds, after one warm-up round.")


def _timed(fn, steps: int, warmup: int) -> float:
  """Median seconds of ``steps`` calls of ``fn()`` (which must block) after ``warmup`` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compile_jax_step(config, batch: dict[str, np.ndarray]) -> tuple[Any, float, Any]:
  """The train step of ``config`` compiled for ``batch`` on all devices: (``run()``, which takes one
  step and blocks, compile seconds, the compiled step's memory analysis or None)."""
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  tx = optimizer.build_optimizer(config, variables["params"], optimizer.learning_rate_schedule(config, 1000))
  step_fn = lambda state, b: step_lib.train_step(state, b, model=model, tx=tx, config=config)
  par = parallel.JitParallel(step_fn, sharding.make_mesh())
  holder = {"state": par.device_state(state_lib.create_train_state(variables, tx, state_lib.dropout_key_data(config)))}
  device_batch = jax.device_put(batch, par.batch_sharding)
  t0 = time.perf_counter()
  memory = par.lower(holder["state"], device_batch).compile().memory_analysis()
  compile_s = time.perf_counter() - t0

  def run():
    holder["state"], metrics = par.step(holder["state"], device_batch)
    metrics["loss"].block_until_ready()

  return run, compile_s, memory


def time_jax_step(config, batch: dict[str, np.ndarray], steps: int, warmup: int,
                  other_step: Any = None) -> tuple[dict[str, float], float | None]:
  """Median step time, compile time and the compiled step's buffer sizes, on all devices; with
  ``other_step`` (a blocking ``run()``, e.g. ``build_hf_step``'s), also its median seconds, the two
  alternating step by step (else None)."""
  run, compile_s, memory = compile_jax_step(config, batch)
  if other_step is None:
    step_s, other_s = _timed(run, steps, warmup), None
  else:
    step_s, other_s = _timed_alternating([run, other_step], steps, warmup)
  out = {"step_s": step_s, "compile_s": compile_s}
  if memory is not None:
    out["temp_bytes"] = memory.temp_size_in_bytes
    out["state_bytes"] = memory.argument_size_in_bytes - sum(v.nbytes for v in batch.values())
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = stats["peak_bytes_in_use"]
  return out, other_s


def _timed_alternating(fns: list, steps: int, warmup: int) -> list[float]:
  """Median seconds of each of ``fns`` (which must block), called in turn: ``warmup`` untimed rounds,
  then ``steps`` timed ones."""
  times = [[] for _ in fns]
  for round_index in range(warmup + steps):
    for fn, record in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      if round_index >= warmup:
        record.append(time.perf_counter() - t0)
  return [statistics.median(record) for record in times]


def build_hf_step(config, batch: dict[str, np.ndarray]):
  """HF ConditionalDetr's train step (loss with its matcher, backward, clip, AdamW) as ``run()``.

  Same sizes as ``config.model`` (HF's own ResNet-18/34/50/101, so no timm/torchvision, without
  DC5), the same trainable set (layer2-4 and the transformer as the original, or the whole
  backbone when ``freeze_stem_and_layer1`` is False) and optimiser groups. For
  ``backbone_norm='group_norm'`` (the demo) HF's frozen BatchNorm layers become
  ``torch.nn.GroupNorm`` with the same group count, so PyTorch does the same work.
  """
  import torch  # pylint: disable=g-import-not-at-top
  # Importing it declares the torchvision ops that PyPI's CUDA torchvision wheel fails to
  # register next to the CPU torch, which transformers' import of torchvision needs.
  import tests.conftest  # pylint: disable=g-import-not-at-top,unused-import
  from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

  m = config.model
  if (m.backbone not in backbone_lib.RESNET_SPECS or m.dilation or m.backbone_num_stages != 4
      or m.backbone_norm == "group_norm_ws" or m.dense_head):
    raise ValueError(f"the HF comparison is built for config.model.backbone in {sorted(backbone_lib.RESNET_SPECS)} "
                     f"with all 4 stages, without dilation, weight standardisation or dense head, got {m.backbone!r} "
                     f"with backbone_num_stages={m.backbone_num_stages}, dilation={m.dilation}, "
                     f"backbone_norm={m.backbone_norm}, dense_head={m.dense_head} (for the demo add "
                     "--config.model.backbone_num_stages=4 --config.model.dilation=False "
                     "--config.model.backbone_norm=group_norm --config.model.enc_layers=2 --config.model.dense_head=False; "
                     "--config.model.dim_feedforward=1024 --config.model.num_queries=50 for the stride-32 demo's model "
                     "in full)")
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset)
  kind, depths = backbone_lib.RESNET_SPECS[m.backbone]
  expansion = 1 if kind == "basic" else 4
  resnet = ResNetConfig(layer_type=kind, depths=list(depths), out_features=["stage4"],
                        hidden_sizes=[w * expansion for w in backbone_lib.STAGE_WIDTHS])
  hf_config = ConditionalDetrConfig(
      backbone_config=resnet, num_labels=m.num_classes, num_queries=m.num_queries,
      d_model=m.hidden_dim, encoder_layers=m.enc_layers, decoder_layers=m.dec_layers,
      encoder_attention_heads=m.nheads, decoder_attention_heads=m.nheads, encoder_ffn_dim=m.dim_feedforward,
      decoder_ffn_dim=m.dim_feedforward, dropout=m.dropout, auxiliary_loss=m.aux_loss)
  model = ConditionalDetrForObjectDetection(hf_config).train()
  if m.backbone_norm == "group_norm":
    for parent in list(model.model.backbone.modules()):
      for child_name, child in parent.named_children():
        if type(child).__name__ == "ConditionalDetrFrozenBatchNorm2d":
          norm = torch.nn.GroupNorm(backbone_lib.GROUP_NORM_GROUPS, child.weight.numel(), eps=1e-5)
          setattr(parent, child_name, norm)
  backbone, rest = [], []
  for name, p in model.named_parameters():
    if "backbone" in name:
      # HF's own test ("stage.1" in name) never matches HF ResNet's "stages.1": train layer2-4 as the original.
      p.requires_grad_(not m.freeze_stem_and_layer1 or any(f"stages.{i}." in name for i in (1, 2, 3)))
      if p.requires_grad:
        backbone.append(p)
    else:
      rest.append(p)
  opt = config.optimizer
  adamw = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": opt.lr * opt.backbone_lr_mult}],
                            lr=opt.lr, weight_decay=opt.weight_decay)
  pixels = torch.tensor(batch["image"]).permute(0, 3, 1, 2).contiguous()
  pixel_mask = torch.tensor(~batch["pad_mask"]).long()
  labels = [{"class_labels": torch.tensor(l[v]).long(), "boxes": torch.tensor(b[v])}
            for l, b, v in zip(batch["labels"], batch["boxes"], batch["box_valid"])]
  params = [p for p in model.parameters() if p.requires_grad]

  def run():
    loss = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
    adamw.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, opt.clip_grad_norm)
    adamw.step()

  return run


def with_overrides(config, text: str):
  """A copy of ``config`` with the ``a.b=value,c=value`` fields of ``text`` set (values parsed as
  Python literals, else kept as strings)."""
  config = config.copy_and_resolve_references()
  for item in filter(None, text.split(",")):
    key, value = item.split("=", 1)
    *path, field = key.split(".")
    node = config
    for part in path:
      node = node[part]
    try:
      node[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[field] = value
  return config


def time_variants_round_robin(config, variants: list[str], batch: dict[str, np.ndarray],
                              rounds: int) -> list[list[float]]:
  """Step seconds of ``config`` and of each variant, one step of each in turn per round, after one
  untimed round: ``[config's times, variant 1's times, ...]``."""
  runs = [compile_jax_step(with_overrides(config, v), batch)[0] for v in [""] + variants]
  times = [[] for _ in runs]
  for round_index in range(rounds + 1):
    for run, record in zip(runs, times):
      t0 = time.perf_counter()
      run()
      if round_index:
        record.append(time.perf_counter() - t0)
  return times


def _hw(text: str) -> tuple[int, int]:
  h, w = text.split("x")
  return int(h), int(w)


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  h, w = _hw(_SIZE.value)
  print(f"device={jax.devices()[0].device_kind} x{jax.device_count()} backend={jax.default_backend()} "
        f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} backbone={config.model.backbone} "
        f"dtype={config.model.dtype} batch={_BATCH.value}", flush=True)
  batch = synthetic_batch(_BATCH.value, h, w, config.dataset.max_boxes,
                          num_classes=config.model.num_classes)
  if _VARIANTS.value:
    times = time_variants_round_robin(config, _VARIANTS.value, batch, _ROUNDS.value)
    base = statistics.median(times[0])
    for name, record in zip(["(config)"] + _VARIANTS.value, times):
      median = statistics.median(record)
      print(f"jax {h}x{w} {name}: step {median:.3f}s (range {min(record):.3f}-{max(record):.3f}s over "
            f"{len(record)} rounds), {median / base:.2f}x the config's", flush=True)
    print(f"loadavg={os.getloadavg()[0]:.1f} after the rounds")
    return
  with_hf = _HF.value == "yes" or (_HF.value == "auto" and jax.default_backend() == "cpu")
  main_step, hf_s = time_jax_step(config, batch, _STEPS.value, _WARMUP.value,
                                  build_hf_step(config, batch) if with_hf else None)
  print(f"jax {h}x{w}: step {main_step['step_s']:.3f}s, {_BATCH.value / main_step['step_s']:.2f} images/s "
        f"(compile {main_step['compile_s']:.1f}s); XLA temp buffers "
        f"{main_step.get('temp_bytes', 0) / _BATCH.value / 2**20:.0f} MiB/image, state "
        f"{main_step.get('state_bytes', 0) / 2**20:.0f} MiB", flush=True)

  if _BUCKET.value:
    bh, bw = _hw(_BUCKET.value)
    bucket_batch = synthetic_batch(_BATCH.value, bh, bw, config.dataset.max_boxes,
                                   num_classes=config.model.num_classes)
    for dtype in _BUCKET_DTYPES.value:
      bucket_config = config.copy_and_resolve_references()
      bucket_config.model.dtype = dtype
      r, _ = time_jax_step(bucket_config, bucket_batch, max(1, _STEPS.value // 2), 1)
      peak = f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB" if "device_peak_bytes" in r else ""
      print(f"jax {bh}x{bw} {dtype}: {_BATCH.value / r['step_s']:.2f} images/s (step {r['step_s']:.3f}s); "
            f"XLA temp buffers {r.get('temp_bytes', 0) / _BATCH.value / 2**30:.2f} GiB/image{peak}", flush=True)

  if with_hf:
    print(f"hf-torch {h}x{w}: step {hf_s:.3f}s, {_BATCH.value / hf_s:.2f} images/s; "
          f"jax/hf speed ratio {hf_s / main_step['step_s']:.2f}x (steps alternated)", flush=True)

  print(f"step_s={main_step['step_s']:.4f}")


if __name__ == "__main__":
  cli.run(main)
