"""PEFT methods, one file each: a frozen Config dataclass, `init`, `apply`, and (where it exists) `merge`/`unmerge`."""
