"""Batch jobs: records in from files and stdin, ordered resumable JSONL out, the output file's safety."""
