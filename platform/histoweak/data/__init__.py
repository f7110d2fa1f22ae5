"""The tile table, synthetic data, and streaming it into training."""
