"""Tessera data layer: shard writing, dataset description, transforms and streaming train/eval loaders."""
