"""Multiply-adds of a JAX function, counted as the papers count them.

DETR's and Conditional DETR's "FLOPs" (the original's README: R50 90 G, DC5-R50 195 G, ...) come
from DETR's counter (a variant of fvcore's ``flop_count`` run on the first 100 COCO val2017 images,
batch 1, averaged): it counts one multiply-add as one FLOP, and only convolutions and matrix
products (``aten::_convolution``, ``addmm``, ``matmul``, ``bmm``, ``einsum``); elementwise ops,
softmax, normalisation, pooling and the post-processing count nothing. ``macs`` applies the same
rule to a jaxpr: it sums the multiply-adds of every ``conv_general_dilated`` and ``dot_general``,
shapes only, nothing is compiled or run. ``cost_analysis`` reads what XLA counted in a compiled
program instead (a multiply-add is 2 FLOPs; elementwise ops count too).
"""

from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import numpy as np


def _conv_macs(eqn: Any) -> int:
  """Output elements x (input features per group x kernel window): the MACs of a convolution."""
  out = eqn.outvars[0].aval.shape
  kernel = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs_spec = (out feature dim, in feature dim, spatial dims...) positions in the kernel's shape.
  rhs_in = kernel[dn.rhs_spec[1]]
  window = int(np.prod([kernel[d] for d in dn.rhs_spec[2:]]))
  return int(np.prod(out)) * rhs_in * window


def _dot_macs(eqn: Any) -> int:
  """Output elements x contracted size: the MACs of a dot_general."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  contracted = int(np.prod([lhs[d] for d in lhs_contract]))
  return int(np.prod(eqn.outvars[0].aval.shape)) * contracted


def _subjaxprs(eqn: Any) -> list[Any]:
  found = []
  for value in eqn.params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(v, jex_core.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jex_core.Jaxpr):
        found.append(v)
  return found


def jaxpr_macs(jaxpr: Any) -> dict[str, int]:
  """{'conv': n, 'dot': n} multiply-adds of a (closed) jaxpr, nested calls included.

  Loops (``scan``, ``while``) count their body once; the detector's forward has none.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = {"conv": 0, "dot": 0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total["conv"] += _conv_macs(eqn)
    elif name == "dot_general":
      total["dot"] += _dot_macs(eqn)
    for sub in _subjaxprs(eqn):
      for k, v in jaxpr_macs(sub).items():
        total[k] += v
  return total


def macs(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
  """Multiply-adds of ``fn(*args)`` by the papers' convention (see the module docstring).

  Args:
    fn: a JAX-traceable function.
    *args: arrays or ``jax.ShapeDtypeStruct``s (only shapes matter).

  Returns:
    ``conv``, ``dot`` and ``total`` multiply-adds.
  """
  counts = jaxpr_macs(jax.make_jaxpr(fn)(*args))
  return dict(counts, total=counts["conv"] + counts["dot"])


def cost_analysis(compiled: Any) -> dict[str, float]:
  """``compiled.cost_analysis()`` as one dict (per device for a partitioned program; empty where
  the backend counts nothing)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return cost or {}
