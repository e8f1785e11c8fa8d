"""Pieces shared by every cycle of the course."""
