"""Tools that compare jaxtune with other things: the PyTorch reference, the peer benchmark, seeds studies,
sweeps and run comparison."""
