"""Independent references the tests compare netmorph with: code written from the papers' formulas that shares none
of netmorph's own code."""
