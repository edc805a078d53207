"""MONAI Label glue for the VILA-M3 app: infer tasks over the ``vila_m3`` core."""
