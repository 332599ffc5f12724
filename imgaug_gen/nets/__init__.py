"""Plain ``nn.Module`` networks (no Lightning, no training logic)."""
