"""Pure graph passes: each takes a GraphModule and returns a new one, never touching its input."""
