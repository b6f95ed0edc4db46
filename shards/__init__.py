"""The feature store: ``STORE/DATASET/EXPERT@FINGERPRINT/`` of immutable, atomically committed units.

```python
from astrea.shards import Store, JoinedDataset
store = Store(root)
edir = store.expert_dir(dataset, spec, create=True)
with edir.open_unit("00000") as w:
    w.add(key, tokens, pooled, outputs); w.add_failure(key2, "undecodable: ...")
    w.commit(extra={"seconds": 1.0})
for rec in edir.iter_unit("00000"): ...
ds = JoinedDataset(store, dataset, ["siglip", "sam2"], shuffle=True, seed=0, rank=0, world_size=1)
```
See docs/store.md for the layout and for reading a store without astrea.
"""

from astrea.shards.errors import DamagedRowError, StoreError, UnitBusyError, UnitCommittedError
from astrea.shards.formats import UNIT_FORMATS, get_format
from astrea.shards.store import ExpertDir, Record, Store
from astrea.shards.writer import UnitWriter

__all__ = ["DamagedRowError", "Store", "ExpertDir", "Record", "UnitWriter", "StoreError", "UnitBusyError", "UnitCommittedError", "UNIT_FORMATS",
           "get_format", "JoinedDataset"]


def __getattr__(name: str):
    # JoinedDataset imports torch; the writer side (extraction, `astrea shards ls`) does not need it.
    if name == "JoinedDataset":
        from astrea.shards.reader import JoinedDataset

        return JoinedDataset
    if name == "FORMATS":  # the old name of UNIT_FORMATS (astrea.schemas and astrea.data had their own FORMATS)
        import warnings

        warnings.warn("astrea.shards.FORMATS is renamed UNIT_FORMATS", DeprecationWarning, stacklevel=2)
        return UNIT_FORMATS
    raise AttributeError(name)
