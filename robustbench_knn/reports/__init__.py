"""Rendering stored results: tables (md/csv/tex) and plots."""
