"""KTO on labelled single actions and NCA on pairs: the objectives that keep the chosen reward up."""
