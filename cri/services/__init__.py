"""What the CRI sees: the servicers, one module per RPC group, and the translation to CRI messages."""
