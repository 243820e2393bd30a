"""Evaluation: perplexity, multiple choice (log-likelihood), generation with answer extraction."""
