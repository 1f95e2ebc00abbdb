"""What a circuit says about cells: the label-to-marker-term map, circuit enrichment, and the
case-study controls (random prompt subsets, the own-type rate)."""
