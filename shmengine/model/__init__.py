"""The model: its directory, vocabulary, graph transforms and the one shared copy of its weights."""
