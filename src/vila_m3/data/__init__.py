"""The data engine: expert-training conversations (VILA / LLaVA JSON) from annotation sessions.

- :mod:`.sources` — a MONAI Label datastore, as a folder or a running server.
- :mod:`.cases` — images with their final labels, read and checked.
- :mod:`.annotations` — what a labelmap says: structures per slice, 3D counts, slice choice.
- :mod:`.questions` — question pools (``configs/questions``), drawn with the seed; train / held-out phrasings.
- :mod:`.conversations` — records from final labels; :mod:`.chats` — records from chats, corrected.
- :mod:`.balance` — deduplication, split by patient or volume, category repeats.
- :mod:`.privacy` — hashed names, DICOM identifiers, the export scan; :mod:`.validate` — structure checks.
- :mod:`.summary` — counts table and chart; :mod:`.export` — the whole export; :mod:`.cli` — commands.

Nothing here imports MONAI Label.
"""

from vila_m3.data.config import DatagenConfig, load_datagen_config
from vila_m3.data.export import ExportError, ExportResult, export_dataset, export_from_app
from vila_m3.data.privacy import Finding, scan_export
from vila_m3.data.validate import check_structure

__all__ = [
    "DatagenConfig",
    "ExportError",
    "ExportResult",
    "Finding",
    "check_structure",
    "export_dataset",
    "export_from_app",
    "load_datagen_config",
    "scan_export",
]
