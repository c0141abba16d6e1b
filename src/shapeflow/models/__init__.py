"""Networks: shared layers, the VecSet VAE and (later) the DiT. Each config dataclass sits beside its model."""
