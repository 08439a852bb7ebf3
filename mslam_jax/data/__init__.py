"""Data plumbing: batch specs and synthetic batches (real corpora come with the data issue)."""
