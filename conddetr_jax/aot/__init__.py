"""Ahead-of-time compilation for accelerators this machine does not have:
``python -m conddetr_jax.aot``.

Needs the TPU compiler (``pip install "jax[tpu]==<installed jax version>"``) or the GPU compiler
(requirements-gpu-compiler.txt, installed into a folder of its own named by
``$CONDDETR_GPU_COMPILER_PATH``), no TPU or GPU. The train step is the one ``train.py`` runs
(``training.loop.build_train_step``: the ``jit`` strategy, the batch and, unless
``config.shard_state`` is False, the weights and optimizer state split over a ``data`` mesh axis
of all the slice's devices); evaluation is ``coco_eval.predict_batch``
(forward + post-processing) at ``eval_per_device_batch_size``. For each size the tool prints the
compiler's own figures: compile seconds, per-device memory against the chip's HBM, FLOPs per image
(XLA's convention: a multiply-add is 2 FLOPs; elementwise ops count too), the collectives of the
compiled program, an ESTIMATE of images/s per chip at 100% and 40% of the chip's bf16 peak
(from FLOPs, never a measurement) and one of the time the collectives keep the chip's links busy.
The GPU compiler gives no cost analysis: for a GPU the FLOPs are the project's counter
(``flops.py``: 2 x the multiply-adds of convolutions and matrix products).

Modules: ``devices`` (compile-only devices and chip figures; ``gpu_targets`` for NVIDIA GPUs),
``compiling`` (compile a program, read its memory and FLOPs; ``hlo`` reads collectives and while
loops, ``flops`` counts multiply-adds), ``batch_search`` (the largest batch that fits), ``stages``
(each stage of the train step compiled alone), ``roofline`` (the stage table and each chip's
roofline from FLOPs and bytes accessed), ``interconnect`` (the collectives' traffic over the
chips' links), ``report`` (the printed table and summary line),
``__main__`` (the command line).
"""
