"""Locations and copies: one store, held in many places (see docs/architecture.md)."""
