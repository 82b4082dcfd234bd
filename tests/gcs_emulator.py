"""The GCS emulator of the cloud-storage tests: gcp-storage-emulator, plus the object-generation
headers that Cloud Storage sends with every download and the emulator leaves out.

Run as ``python -m tests.gcs_emulator --port=P --bucket=B`` (127.0.0.1, in memory, quiet).

Why the patch: Cloud Storage answers a media download (``GET .../o/NAME?alt=media``) with the
object's ``x-goog-generation`` and ``x-goog-metageneration`` headers (JSON API objects.get; XML API
reference headers). gcp-storage-emulator 2026.7.19 sends neither. TensorStore's GCS driver reads an
object's generation from that header, takes 0 when it is missing, and then refuses to send its own
conditional write ``ifGenerationMatch=0`` of that "generation" (``Malformed StorageGeneration``).
Orbax's OCDBT checkpoints read ``manifest.ocdbt`` and rewrite it on that condition, so without the
headers a checkpoint in the emulated bucket fails as soon as a manifest is read back before being
rewritten. The emulator's uploads already return the generation in their JSON; only downloads lack
it.
"""

import sys

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  """The emulator's download, plus the headers Cloud Storage sends with the object's bytes."""
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


def main(argv: list[str]) -> None:
  """Serves ``--bucket`` on 127.0.0.1:``--port`` until terminated."""
  flags = dict(arg.lstrip("-").split("=", 1) for arg in argv)
  # objects.get serves ``alt=media`` by calling the module's ``download``; the download routes
  # hold the function itself (a tuple built at import).
  objects.download = _download_with_generation
  server.HANDLERS = tuple(
    (
      regex,
      {
        method: _download_with_generation if handler is _download else handler
        for method, handler in handlers.items()
      },
    )
    for regex, handlers in server.HANDLERS
  )
  emulator_main.main(
    [
      "start",
      "--host=127.0.0.1",
      f"--port={flags['port']}",
      "--in-memory",
      "--quiet",
      f"--default-bucket={flags['bucket']}",
    ]
  )


if __name__ == "__main__":
  main(sys.argv[1:])
