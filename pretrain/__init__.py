"""MAE pretraining entry point (`pretrain/mae.py`) and its config."""
