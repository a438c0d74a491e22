"""Downstream entry points: linear probing, fine-tuning and evaluation of pretrained encoders."""
