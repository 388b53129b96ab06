"""Training rewards computed from captions (CIDEr-D)."""
