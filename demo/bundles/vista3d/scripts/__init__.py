"""Python helpers of the VISTA3D stand-in bundle, named by configs/inference.json."""
