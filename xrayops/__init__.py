"""xrayops core."""
