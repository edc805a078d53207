"""Synthetic sample studies: an abdominal CT, a four-sequence brain MRI and a chest X-ray.

They are drawn phantoms, not patient data, small and deterministic for a seed, with ground truth
(VISTA3D and BRATS labelmaps, X-ray findings) so the experts and the chat loop can be tried and
tested without any real study. ``generate_samples`` writes them; ``vila-m3 samples --out DIR``
(``main`` here) does the same from the command line.
"""

from vila_m3.samples.generate import (
    CT_ID,
    CXR_ID,
    GENERATOR_VERSION,
    MRI_ID,
    MRI_SEQUENCES,
    ct_tumour_slice,
    generate_samples,
    load_current_manifest,
    main,
)

__all__ = [
    "CT_ID",
    "CXR_ID",
    "GENERATOR_VERSION",
    "MRI_ID",
    "MRI_SEQUENCES",
    "ct_tumour_slice",
    "generate_samples",
    "load_current_manifest",
    "main",
]
