"""CMAL processors: the region image processor, the anchor lexicon and the paired `CMALProcessor`."""
