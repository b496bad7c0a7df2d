"""The concept-inversion attack: the embedding's training and its scoring."""
