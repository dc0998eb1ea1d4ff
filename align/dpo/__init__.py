"""Direct preference optimisation from an SFT adapter (reference: the same adapter, frozen)."""
