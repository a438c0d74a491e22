"""The CIFAR-10 chain: shards -> MAE pretraining -> linear probe -> fine-tuning -> docs/RESULTS.md, one command
(`python recipes/cifar10/chain.py --budget cpu|gpu|micro`)."""
