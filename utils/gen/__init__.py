"""Generation: pipelines and generate.py's image folders."""
