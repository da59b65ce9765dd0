"""Datasets: the synthetic world, video file I/O and shard writing."""
