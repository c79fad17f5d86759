"""Thin HTTP routers: parse, resolve the caller, call one service function, return a schema."""
