"""Model weights: the manifest of real weights (source, revision, where they go) and their staging.

The generators of tiny stand-ins in the same layout live in :mod:`vila_m3.standins`."""
