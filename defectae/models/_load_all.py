"""Importing this module registers every model family."""
