"""Local TFDS builders: datasets of the paper that TFDS' catalog lacks, built from files a user places.

Importing this package registers the builders with TFDS:

==========================  =============================================
TFDS name                   dataset
==========================  =============================================
``tap_tiny_imagenet``       Tiny-ImageNet-200 (:mod:`.tiny_imagenet`)
``tap_caltech256``          Caltech-256 (:mod:`.caltech256`)
``tap_vqav2_small``         VQAv2-small (:mod:`.vqav2_small`)
``tap_mmlu/<subject>``      MMLU law / medicine / moral (:mod:`.mmlu`)
==========================  =============================================

Each builder's ``MANUAL_DOWNLOAD_INSTRUCTIONS`` lists the file layouts it
reads; ``python -m tapjax.data.sources.prepare NAME --manual_dir DIR`` builds
it (see ``tapjax/data/sources/DATASETS.md``).
"""

from tapjax.data.sources.builders.base import LayoutNotFoundError, LocalBuilder
from tapjax.data.sources.builders.caltech256 import TapCaltech256
from tapjax.data.sources.builders.mmlu import TapMmlu
from tapjax.data.sources.builders.tiny_imagenet import TapTinyImagenet
from tapjax.data.sources.builders.vqav2_small import TapVqav2Small

__all__ = [
  "LayoutNotFoundError",
  "LocalBuilder",
  "TapCaltech256",
  "TapMmlu",
  "TapTinyImagenet",
  "TapVqav2Small",
]
