"""Pickled data files read without running code.

RefCOCO's `refs(unc).p` and the `info` entry of bottom-up-attention.pytorch (MILVLG)'s `.npz` files are pickles, and
`pickle.load` runs whatever callable a file names: a downloaded file could execute anything. These
readers build only plain containers, numbers, strings and numpy arrays; any other global the file
names is refused with the file's name, before anything is called.
"""

import pickle
import zipfile

import numpy as np


# The globals a pickled numpy array needs (numpy 1.x and 2.x module names); each only builds data.
NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
}


class DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global outside `allowed`, so it never calls foreign code."""

    def __init__(self, file, path: str, allowed=frozenset()):
        super().__init__(file)
        self.path, self.allowed = path, allowed

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise ValueError(f"{self.path}: refusing to unpickle `{module}.{name}`: a data file may hold only lists, dicts, "
                         "numbers, strings and arrays, and unpickling anything else can run code")  # fmt: skip

    def persistent_load(self, pid):
        raise ValueError(f"{self.path}: refusing a pickle with persistent ids: not a data file")


def load_data_pickle(path: str):
    """A pickle of plain containers, numbers and strings (e.g. RefCOCO's `refs(unc).p`)."""
    with open(path, "rb") as f:
        try:
            return DataUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"{path}: not a readable pickle ({error})") from None


def load_npz_object(path: str, key: str):
    """The object array `key` of an `.npz` file (what `np.load(allow_pickle=True)[key]` gives), unpickled
    with numpy arrays as the only globals allowed."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError(f"{path}: `{key}` holds {dtype} values, not the pickled object expected")
        try:
            return DataUnpickler(f, f"{path} ({key})", NUMPY_GLOBALS).load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"{path}: `{key}` is not a readable pickle ({error})") from None
