"""Flax models, component rules and weight converters (edge layer)."""
