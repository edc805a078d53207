"""VILA-M3 core: imaging, the VLM, the experts, the chat loop, the data engine and model staging.

Nothing in this package imports MONAI Label; the MONAI Label app in ``apps/vila_m3`` is a thin
shell over it.
"""

__version__ = "0.1.0"
