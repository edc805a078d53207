"""A MONAI Label studies folder whose final labels are the phantoms' ground truth.

This is what an annotation session leaves behind (images plus ``labels/final/``), made from the
synthetic studies, so that the data engine and training can run end to end without patient data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vila_m3.samples.generate import CT_ID, CXR_ID, MRI_ID, MRI_SEQUENCES, generate_samples

__all__ = ["annotated_studies"]


def annotated_studies(out_dir: str | Path, seeds: tuple[int, ...] = (0,), scratch: str | Path | None = None) -> Path:
    """Write the sample studies of each seed, with their ground truth as final labels, into one folder.

    Args:
        out_dir: the studies folder to create (images at the top, ``labels/final/`` beside them).
        seeds: phantom seeds; the studies of seed ``s`` are named ``<study>_s<s>`` (seed 0 keeps the
            sample names, ``ct_abdomen`` ...).
        scratch: where the generated samples are written first (default: ``<out_dir>/../.samples``).

    Returns:
        The studies folder.
    """
    studies = Path(out_dir)
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    scratch_root = Path(scratch) if scratch else studies.parent / ".samples"
    for seed in seeds:
        source = scratch_root / f"seed{seed}"
        generate_samples(source, seed=seed)
        suffix = "" if seed == 0 else f"_s{seed}"
        shutil.copy(source / "studies" / f"{CT_ID}.nii.gz", studies / f"{CT_ID}{suffix}.nii.gz")
        shutil.copy(source / "ground_truth" / f"{CT_ID}.nii.gz", final / f"{CT_ID}{suffix}.nii.gz")
        for sequence in MRI_SEQUENCES:
            name = f"{MRI_ID}{suffix}_{sequence}.nii.gz"
            shutil.copy(source / "studies" / f"{MRI_ID}_{sequence}.nii.gz", studies / name)
        shutil.copy(source / "ground_truth" / f"{MRI_ID}.nii.gz", final / f"{MRI_ID}{suffix}_t1c.nii.gz")
        shutil.copy(source / "studies" / f"{CXR_ID}.png", studies / f"{CXR_ID}{suffix}.png")
        shutil.copy(source / "ground_truth" / f"{CXR_ID}.json", final / f"{CXR_ID}{suffix}.json")
    return studies
