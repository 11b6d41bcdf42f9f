"""The graph IR and its passes: build the graph from the syntax tree, infer shapes, count."""
