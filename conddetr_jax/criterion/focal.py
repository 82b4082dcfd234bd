"""The sigmoid focal loss (Lin et al., RetinaNet), the class loss of every head here."""

import jax
import jax.numpy as jnp


def sigmoid_focal_loss(
  logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
  """Elementwise sigmoid focal loss (RetinaNet), unreduced.

  Args:
    logits: (...,) float logits.
    targets: (...,) float in {0, 1}, same shape.
    alpha: weight of positives (1 - alpha for negatives); no weighting if < 0.
    gamma: focusing exponent.

  Returns:
    (...,) float32 loss.
  """
  prob = jax.nn.sigmoid(logits)
  # Binary cross-entropy with logits, in its overflow-free form.
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss
