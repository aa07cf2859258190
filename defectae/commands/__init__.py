"""One module per CLI command, each with one entry function `run`; commands never import each other."""
