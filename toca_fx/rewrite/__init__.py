"""Graph rewrites: the full and partial variants of a graph, gather-compute-scatter per branch."""
