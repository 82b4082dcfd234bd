"""Runs a script (train.py, eval.py) as one process of a multi-process test run, letting every
process write JAX's persistent compilation cache, not only process 0.

    python tests/every_process_caches.py train.py --config=... --process_id=1 ...

On CPU a process's cache keys include its process index (the CPU topology's fingerprint does), so
process 1 never finds what process 0 wrote, and JAX lets only process 0 write: every process but
the first compiled every program again in every two-process run of the suite (the tiny init, train
step and predict step: about 30-60 CPU-seconds a launch, docs/testing.md). Writing its own entries
lets a later launch of process 1 read them. Only the cache's filling changes, not what runs; real
clusters keep JAX's rule (one writer; their hosts share keys).
"""

import os
import runpy
import sys

from conddetr_jax import cli


def let_every_process_write_the_cache() -> None:
  """Lifts JAX's process-0-only rule for persistent-cache writes in this process.

  JAX has no public switch for it: this wraps a private function, and warns (the run is only
  slower) where a JAX version lacks it.
  """
  try:
    from jax._src import compiler, distributed  # pylint: disable=g-import-not-at-top

    write = compiler._cache_write  # pylint: disable=protected-access
    distributed.global_state.process_id  # pylint: disable=pointless-statement
  except (ImportError, AttributeError) as e:
    print(
      f"tests/every_process_caches.py: not caching this process's programs ({e!r})", file=sys.stderr
    )
    return

  def write_as_process_0(*args, **kwargs):
    process_id = distributed.global_state.process_id
    distributed.global_state.process_id = 0
    try:
      return write(*args, **kwargs)
    finally:
      distributed.global_state.process_id = process_id

  compiler._cache_write = write_as_process_0  # pylint: disable=protected-access


if __name__ == "__main__":
  cli.quiet_native_logs()  # what the script does first, before JAX loads here
  let_every_process_write_the_cache()
  sys.argv = sys.argv[1:]
  sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as if the script were run itself
  runpy.run_path(sys.argv[0], run_name="__main__")
