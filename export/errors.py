"""The export side's error type, in a module of its own so every export module can raise it without
importing the exporter (which imports them)."""


class ExportError(RuntimeError):
    """Export could not produce a correct artifact (a quality gate failed, bad source…)."""
