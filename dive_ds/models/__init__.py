"""Dense model loading and the DIVE MoE model (no torch.distributed here)."""
