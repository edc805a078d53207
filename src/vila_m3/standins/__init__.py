"""Stand-in weights: tiny generators in the exact on-disk layout of the real models (VISTA3D and BRATS bundles,
TorchXRayVision weights, VILA checkpoints) with random values, for tests, benchmarks and the offline demo.

Only the command line (``vila-m3 models stand-ins``), the demo build (:mod:`vila_m3.training.demo`), the
benchmarks and the tests import this package; the product's own code (experts, models, VLM) never does.
"""
