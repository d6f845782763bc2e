"""Serving backends: one package each, behind one contract.

- `base.py`: the contract every backend implements (`Backend`): what it accepts (modes, options,
  architectures, model and adapter limits, checked at pre-flight), whether it can run here
  (`unavailable_reason`), `deploy` (plans and runs its own cached stages, returns typed
  `Deployment`s) and `open` (a runtime for the smoke test).
- `registry.py`: backend name → the module that defines it (one line per backend).
- `runtime.py`: what an engine gives the smoke test (`Generation`, `Engine`).
- `<name>/backend.py` in every backend package: its `BACKEND`; beside it the stages, formats
  and runtime it needs (see docs/backends.md, "Adding a backend").
"""
