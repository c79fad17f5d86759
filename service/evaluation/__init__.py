"""Offline evaluation: LaMP-format files, the MovieLens rating task, and LaMP-3 style metrics.

Pure data code: no SQL, no torch, no HTTP. The runner that drives the server lives beside these.
"""
