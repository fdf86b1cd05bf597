"""Integrations with data engines: Arrow tables (bgert.integrations.arrow) and Ray Data
(bgert.integrations.ray). Each needs its extra (``bgert[parquet]``, ``bgert[ray]``)."""
