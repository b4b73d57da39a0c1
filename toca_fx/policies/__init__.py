"""Policies: which variant a call runs, and what each branch does in it. Policies are data."""
