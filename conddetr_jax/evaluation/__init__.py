"""From model outputs to detections and COCO AP: post-processing, evaluation over a split, eval.py's
library."""
