"""Training: the jitted step built once, the loop, the optimiser, AOT compiles, feature extraction."""
