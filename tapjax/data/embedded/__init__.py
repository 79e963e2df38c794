"""The embedded default federation: built offline, in seconds, from a seed.

* :func:`make_embedded_federation` (:mod:`~tapjax.data.embedded.federation`):
  10 client patterns per group mirroring the paper's, from the sources below.
* :mod:`~tapjax.data.embedded.shapes`: procedural images (shapes, VQA scenes).
* :mod:`~tapjax.data.embedded.text`: procedural text (news topics,
  multiple-choice QA, concept-to-sentence).
* :mod:`~tapjax.data.embedded.digits`: scikit-learn's real 8x8 digits.
"""

from tapjax.data.embedded.federation import make_embedded_federation

__all__ = ["make_embedded_federation"]
