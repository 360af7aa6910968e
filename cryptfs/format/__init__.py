"""How things are encoded: the primitives, the sealed object formats, the store layout and
the vault config."""
