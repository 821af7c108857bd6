"""Reading python pickles without running code: CIFAR's batch files are pickled dicts of numpy arrays, lists,
bytes, strings and numbers, so the unpickler admits only the few globals that rebuild a numpy array and refuses any
other (an arbitrary global is how a crafted pickle runs a command)."""
from __future__ import annotations

import os
import pickle


class PickleFileError(ValueError):
    """A pickle file that kdfast will not or cannot read; the message names the file."""


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); no other codec is admitted.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict:
    import numpy as np
    # numpy's array-rebuilding functions (protocols up to 4, and 5's out-of-band buffers), wherever they live:
    # numpy 1 and numpy 2 spell their modules differently.
    reconstruct = np.zeros(1).__reduce_ex__(2)[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(core + ".multiarray", "_reconstruct")] = reconstruct
        allowed[(core + ".numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, allowed):
        super().__init__(fh, encoding="bytes")
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return self.allowed[(module, name)]


def load_data_pickle(path):
    """The object pickled in path, if it is built only of numpy arrays, lists, tuples, dicts, bytes, strings and
    numbers; PickleFileError naming the file otherwise (nothing in the file is executed)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, _numpy_globals()).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused global"):
            raise PickleFileError(f"{path}: refused, the pickle asks for {str(e)[len('refused global '):]}, which a "
                                  f"data file never needs (loading it could run code)") from None
        raise PickleFileError(f"{path}: not a readable python pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError) as e:
        raise PickleFileError(f"{path}: not a readable python pickle ({type(e).__name__}: {e})") from None
