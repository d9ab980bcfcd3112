"""Data: where rows come from (sources), how they become token arrays (tasks), how they batch."""
