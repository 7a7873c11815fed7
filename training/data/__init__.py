"""Data for CMAL training: the region-feature store shared by the extractor, the converters and the data loaders."""
