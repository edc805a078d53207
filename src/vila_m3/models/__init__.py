"""Model weights: the manifest of real weights (source, revision, where they go) and generators of
tiny stand-ins in the exact on-disk layout of the real ones, for tests and the offline demo."""
