"""Domain registry, demo text pack, calibration sampling, training streams."""
