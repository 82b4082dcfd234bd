"""The DETR set criterion: box geometry, the focal loss, Hungarian matching, and the losses."""
