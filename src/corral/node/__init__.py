"""The node: runs sandboxes on this host (runtime, storage, network, cgroups) and serves envd for them."""
