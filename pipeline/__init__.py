"""Genesis Pipeline."""
