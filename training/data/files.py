"""The writers of the JSON and text files the package saves (results, metadata, manifests): atomic, and light to
import (no torch), so the data layer and the benchmarks use them without loading the training stack."""

import json
import os


def write_text(path: str, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
