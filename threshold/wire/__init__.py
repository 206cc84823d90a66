"""Codecs for everything threshold reads off the network or disk: pure, no reactor."""
