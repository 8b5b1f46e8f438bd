"""Evaluation: FID and KID of samples against a reference. inception (the network and its weights guard) ->
stats (statistics of a set of images, the statistics file) -> scores (FID, KID); sources (what images come
from), reference (reference statistics and their cache), run (the `ddpm eval` command and in-training FID)."""
