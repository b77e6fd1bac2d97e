"""Whole programs and real tools: training runs, export, Prometheus, deploy checks, soak, sweep."""
