"""Shared library behind the train_*.py, generate.py and evaluate.py scripts."""
