"""`ukc doctor`: a short live conformance probe of a metro against what `ukc` assumes of it."""
