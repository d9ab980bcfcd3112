"""Data: where rows come from (sources, splits, origin), how each task encodes them into token arrays, how they
batch and feed."""
