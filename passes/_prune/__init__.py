"""Helpers of the prune pass (opc.passes.prune_weights): layer views, masks,
calibration capture, least-squares reconstruction and channel dependency groups."""
