"""The twistd service makers, one module per role."""
