"""Migration sources: anything that yields (header, row batches) with a resumable position."""
