"""The public classes: what a caller constructs, the options it passes, the results it gets back."""
