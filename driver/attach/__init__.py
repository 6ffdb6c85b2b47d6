"""How a node turns a volume into a block device: one module per attach protocol."""
