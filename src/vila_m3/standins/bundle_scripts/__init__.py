"""The ``scripts/`` folders of the stand-in bundles, one sub-folder per bundle, copied byte for byte into a
written bundle (:func:`vila_m3.standins.tiny_bundles.make_tiny_vista3d_bundle`)."""
