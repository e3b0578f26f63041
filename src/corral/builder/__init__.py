"""Templates: turn instructions into cached, content-addressed layers (and the default `base` image)."""
