"""Reports of the product's results in a PACS's own formats (DICOM Structured Reports)."""
