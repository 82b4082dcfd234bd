"""What the accelerators can do and what a program costs: chips' datasheet figures by JAX
``device_kind`` (``chips``; NVIDIA GPUs in the detail XLA's compiler takes, ``gpu_targets``) and the
multiply-adds of a traced function (``flops``). Used by the aot tool and by training's telemetry."""
