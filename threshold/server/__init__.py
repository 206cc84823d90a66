"""The gateway role: control sessions, public front ends, tunnel table, API."""
