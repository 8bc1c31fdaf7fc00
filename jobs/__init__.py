"""Entry points: pretraining, shards, export and the demo (`vit-pretrain`, `vit-shards`,
`vit-export`, `vit-demo`; or `python -m jobs.<name>`, or `python jobs/<name>.py`)."""
