"""Name -> class registries, one per component kind (encoders, fusions, losses, tokenizers).

A registry is a plain dict filled by explicit imports in the kind's ``__init__.py``, so "where is
``vit`` defined?" is answered by reading one line. Unknown names and unknown constructor arguments fail
loudly with the valid choices (unlike registries that silently return ``None``).
"""
from __future__ import annotations

import inspect
from typing import Any


class Registry(dict):
    def __init__(self, kind: str, entries: dict[str, type]):
        super().__init__(entries)
        self.kind = kind

    def __getitem__(self, name: str) -> type:
        if name not in self:
            raise KeyError(f"unknown {self.kind} '{name}'; valid names: {', '.join(sorted(self))}")
        return super().__getitem__(name)

    def build(self, name: str, args: dict[str, Any] | None = None, **injected: Any):
        """Construct ``name`` with ``args`` (from a config). ``injected`` values (e.g. ``vocab_size``)
        are passed only when the constructor accepts them and the config did not set them."""
        cls = self[name]
        args = dict(args or {})
        params = inspect.signature(cls.__init__).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
        bad = [k for k in args if k not in params and not accepts_any]
        if bad:
            raise TypeError(f"{self.kind} '{name}' got unknown argument(s) {bad}; valid arguments: {valid}")
        for key, value in injected.items():
            if key in params and key not in args:
                args[key] = value
        missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
                   and v.kind is inspect.Parameter.KEYWORD_ONLY and p not in args]
        if missing:
            raise TypeError(f"{self.kind} '{name}' is missing required argument(s) {missing}")
        return cls(**args)
