"""
Data for training: the shard format (shard.py), tokenizers (tokenizer.py),
batch loaders (loader.py), and three ways to get shards: fineweb.py downloads
the speedrun's FineWeb, prepare.py tokenizes your own text, demo.py builds a
small offline set from Python's own docs.

Nothing is imported here, so the command-line tools start without loading torch.
"""
