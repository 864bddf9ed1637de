"""Conversions to and from other tools' adapter formats."""
