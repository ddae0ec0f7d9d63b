"""Demonstration collection and training."""
