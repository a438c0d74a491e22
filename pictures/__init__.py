"""Pictures of models: MAE reconstruction grids, attention-map overlays, and the `pictures/visualize.py` command that
draws them from a checkpoint. Image grids are PIL; heat-map colours come from matplotlib's colormaps."""
