"""One train step cut into its stages, each compiled on its own for the same devices: where the
FLOPs and the memory traffic of the step go.

Stages are the detector's top-level submodules (backbone, input projection, encoder, decoder, the
class and box heads), each as forward + backward (the gradient of its parameters and, but for the
backbone's images, of its inputs), then the criterion (matching and losses, forward + backward
with respect to the model's outputs), the matching alone, and the optimizer update. Each module is
the detector's own (intercepted while the detector runs on abstract inputs, then applied alone
with its part of the variables), so the stages compile exactly the code the step runs.

What the sum of the stages leaves out: the glue between modules (the position encoding, reshapes,
the box head's reference-point offset) and what XLA fuses across a stage boundary in the whole
step (a stage alone writes its outputs to memory and reads its inputs; in the step some of that
traffic fuses away), so the stages' bytes add up to more than the step's. ``StageTable.rest``
holds the step minus the stages' sum.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from conddetr_jax.criterion import losses, matching
from conddetr_jax.hardware import chips, flops
from conddetr_jax.training import optimizer

# The detector's submodules that are stages, in the order they run, and each one's row name.
MODULE_STAGES = {
  "backbone": "backbone",
  "input_proj": "input projection",
  "encoder": "encoder",
  "decoder": "decoder",
  "class_embed": "heads",
  "bbox_embed": "heads",
}


@dataclasses.dataclass(frozen=True)
class StageCost:
  """One program's cost per device, as XLA's ``cost_analysis`` counts it."""

  flops: float
  bytes_accessed: float

  @property
  def flops_per_byte(self) -> float:
    return self.flops / self.bytes_accessed if self.bytes_accessed else float("nan")

  def roofline_s(self, chip: chips.Chip) -> float | None:
    """The larger of compute at the bf16 peak and traffic at the HBM bandwidth, or None without a
    peak."""
    if chip.bf16_tflops is None:
      return None
    return max(self.flops / (chip.bf16_tflops * 1e12), self.bytes_accessed / (chip.hbm_gbs * 1e9))


def cost_of(compiled: Any) -> StageCost:
  """``StageCost`` of a compiled program (zeros where the backend counts nothing)."""
  cost = flops.cost_analysis(compiled)
  return StageCost(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))


def _module_calls(
  model: nn.Module, variables: Any, images: Any, pad_mask: Any
) -> dict[str, tuple[nn.Module, tuple]]:
  """Each stage module of ``model`` (unbound) with the abstract arguments it is called with."""
  calls = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    path = module.scope.path if module.scope is not None else ()
    if (
      context.method_name == "__call__"
      and len(path) == 1
      and path[0] in MODULE_STAGES
      and path[0] not in calls
    ):
      calls[module.name] = (module.clone(parent=None), args)
    return next_fun(*args, **kwargs)

  def forward(v, x, m):
    with nn.intercept_methods(record):
      return model.apply(v, x, m, train=True, rngs={"dropout": jax.random.PRNGKey(0)})

  jax.eval_shape(forward, variables, images, pad_mask)
  return calls


def _forward_backward(
  module: nn.Module, name: str, differentiate_inputs: bool, rng_impl: str
) -> Callable[..., Any]:
  """fn(variables, cotangent, *args): the module's forward and the vjp of its outputs.

  Its dropout draws from a key of ``rng_impl``, the step's ``config.rng_impl``: RBG's bits cost
  other bytes and FLOPs than threefry's, so with the default key a stage would not cost what it
  costs in the step.
  """

  def run(variables, cotangent, *args):
    sub = {col: tree[name] for col, tree in variables.items() if name in tree}
    params = sub.pop("params", {})

    def apply(p, *inputs):
      return module.apply(
        {"params": p, **sub}, *inputs, rngs={"dropout": jax.random.key(0, impl=rng_impl)}
      )

    if differentiate_inputs:
      out, vjp = jax.vjp(apply, params, *args)
    else:
      out, vjp = jax.vjp(lambda p: apply(p, *args), params)
    return vjp(jax.tree.map(lambda o, c: c.astype(o.dtype), out, cotangent))

  return run


@dataclasses.dataclass
class StageTable:
  """Per-stage costs of one train step, the whole step's, and the step minus the stages' sum."""

  stages: dict[str, StageCost]
  step: StageCost

  @property
  def rest(self) -> StageCost:
    total = lambda field: sum(
      getattr(s, field) for name, s in self.stages.items() if name != "matching"
    )
    return StageCost(
      self.step.flops - total("flops"), self.step.bytes_accessed - total("bytes_accessed")
    )


def stage_programs(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  variables: Any,
  batch: dict[str, Any],
  abstract_state: Any,
) -> dict[str, tuple[Callable[..., Any], tuple]]:
  """name -> (function, abstract arguments) for every stage of the train step on ``batch``.

  ``variables`` and ``batch`` hold ``jax.ShapeDtypeStruct`` leaves (with shardings if the caller
  compiles for several devices); ``abstract_state`` is the train state's (its ``opt_state`` and
  ``params`` give the optimizer update's shapes).
  """
  programs: dict[str, tuple[Callable[..., Any], tuple]] = {}
  as_cotangent = lambda tree: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree
  )
  heads = []
  for name, (module, args) in _module_calls(
    model, variables, batch["image"], batch["pad_mask"]
  ).items():
    out = jax.eval_shape(
      lambda v, *a, m=module, n=name: m.apply(
        {c: t[n] for c, t in v.items() if n in t}, *a, rngs={"dropout": jax.random.PRNGKey(0)}
      ),
      variables,
      *args,
    )
    fn = _forward_backward(
      module, name, differentiate_inputs=name != "backbone", rng_impl=config.rng_impl
    )
    if MODULE_STAGES[name] == "heads":
      heads.append((fn, (variables, as_cotangent(out), *args)))
      continue
    programs[MODULE_STAGES[name]] = (fn, (variables, as_cotangent(out), *args))
  if heads:  # the two heads as one program: both run on the decoder's output
    programs["heads"] = (
      lambda first, second: (heads[0][0](*first), heads[1][0](*second)),
      tuple(args for _, args in heads),
    )

  outputs = jax.eval_shape(
    lambda v, x, m: model.apply(v, x, m, train=True, rngs={"dropout": jax.random.PRNGKey(0)}),
    variables,
    batch["image"],
    batch["pad_mask"],
  )
  outputs = as_cotangent(outputs)
  targets = {k: batch[k] for k in ("boxes", "labels", "box_valid")}
  programs["criterion"] = (
    jax.grad(lambda out, b: losses.set_criterion(out, b, config)["loss"]),
    (outputs, targets),
  )

  def match(out, b):
    logits = jnp.stack(
      [o["pred_logits"] for o in out.get("aux_outputs", [])] + [out["pred_logits"]]
    )
    boxes = jnp.stack([o["pred_boxes"] for o in out.get("aux_outputs", [])] + [out["pred_boxes"]])
    return matching.match(logits, boxes, matching.Targets.of_batch(b), config.matcher).target_index

  programs["matching"] = (match, (outputs, targets))

  tx = optimizer.build_optimizer(
    config, abstract_state.params, optimizer.learning_rate_schedule(config, 1000)
  )

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  programs["optimizer update"] = (
    update,
    (abstract_state.params, abstract_state.opt_state, abstract_state.params),
  )
  return programs


def _placed(tree: Any, batch_size: int, batch_sharding: Any, replicated: Any) -> Any:
  """Abstract arrays without a sharding get one: split over the batch if their leading axis is the
  batch's, else replicated (as the whole step holds them)."""

  def place(x):
    if getattr(x, "sharding", None) is not None:
      return x
    sharding = batch_sharding if x.ndim and x.shape[0] == batch_size else replicated
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(place, tree)


def stage_table(
  compiler: Any, per_device_batch: int, hw: tuple[int, int], step: StageCost
) -> StageTable:
  """Compiles every stage of ``compiler``'s train step (a ``compiling.SliceCompiler``) for
  ``per_device_batch`` images of ``hw`` per device; ``step`` is the whole step's cost (the caller
  has compiled it already: a second compile of minutes would give the same figures)."""
  state, batch = compiler.train_args(per_device_batch, hw)
  batch_size = per_device_batch * compiler.devices
  programs = stage_programs(compiler.config, compiler.model, compiler.variables, batch, state)
  costs = {}
  for name, (fn, args) in programs.items():
    args = _placed(args, batch_size, compiler.par.batch_sharding, compiler.replicated)
    costs[name] = cost_of(compiler.compile(lambda f=fn, a=args: jax.jit(f).lower(*a)).executable)
  return StageTable(costs, step)
