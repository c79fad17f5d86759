"""Request batching: concurrent generate calls of any users become mixed batches."""
