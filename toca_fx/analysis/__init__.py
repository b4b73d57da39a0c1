"""Graph analysis: residual stream, branch classification, token-axis propagation."""
